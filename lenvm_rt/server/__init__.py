"""OpenAI-compatible, length-aware HTTP server with continuous batching (`lenvm-rt serve`).

engine.py    the continuous decode batch on one background thread (Engine)
slots.py     its step-controller slots and KV-row helpers
protocol.py  request schemas, validation and OpenAI-shaped errors
app.py       the FastAPI application (create_app) and the in-process uvicorn launcher (ServerThread)
Needs the `serve` extra: pip install "lenvm_rt[serve]".
"""

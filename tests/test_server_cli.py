"""`lenvm-rt serve` as a user runs it: a child process on a free loopback port, one request, SIGINT, clean exit."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
from checkpoints import make_checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_answers_and_stops(tmp_path):
    policy = make_checkpoint(tmp_path / "policy", "llama", seed=3)
    port = _free_port()
    cmd = [sys.executable, "-m", "lenvm_rt", "serve", "--model", str(policy), "--device", "cpu", "--port", str(port),
           "--served-model-name", "tiny", "--log-level", "warning", "--threads", "1"]
    proc = subprocess.Popen(cmd, cwd=tempfile.gettempdir(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).json()["status"] == "ok":
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            time.sleep(0.2)
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "The quick", "max_tokens": 3,
                                                      "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out

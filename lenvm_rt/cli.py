"""`lenvm-rt` command line: a thin layer over `load` and `Runtime`; no logic of its own.

    lenvm-rt demo                                   the embedded default model, end to end
    lenvm-rt generate --prompt TEXT [--json] ...    one generation (chat template unless --raw)
    lenvm-rt values --value-model P --prompt T --response R [--plot out.png] [--json]
    lenvm-rt predict --value-model P --prompt T [--prompt T2 ...] [--json]
    lenvm-rt bench decode [--json] ...              per-token time vs transformers and the floor
    lenvm-rt bench guided [--json] ...              guided vs plain, both configurations, vs the reference
    lenvm-rt bench value-head [--json] ...          the value read's cost on top of a decode step
    lenvm-rt bench serve [--json] ...               the server: throughput, TTFT, ITL at 1/4/16 streams
    lenvm-rt serve --model M [--value-model V] [--host 127.0.0.1] [--port 8000]   OpenAI-compatible server
    lenvm-rt prompt-mix | rollouts | train ...      value pretraining (cli_train.py)
    lenvm-rt eval lifebench | tradeoff | mre | length-tokens | report ...   evaluation suites

Bad arguments and bad inputs print one `error: ...` line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .cli_eval import add_eval_commands
from .cli_eval_lifebench import add_lifebench_command
from .cli_eval_report import add_report_command
from .cli_train import add_training_commands
from .config import Sampling

if TYPE_CHECKING:
    from .quality import TextQuality
    from .runtime import StreamEvent


def _threads(n: int | None) -> None:
    import torch

    if n is not None:
        if n < 1:
            raise ValueError(f"--threads must be >= 1; got {n}")
        torch.set_num_threads(n)


# min-p keeps improbable tokens out of the candidate set, so a length rule steers the length without wrecking the
# text (0.7: the guard of the published LIFEBench run, README "Quality guard"); generate's default with --length
GUARD_MIN_P = 0.7


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="checkpoint directory, hub id, or 'default'")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: fp32 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=None,
                   help=f"keep tokens with p >= min_p * p_max (default: {GUARD_MIN_P} with --length, the quality "
                        "guard; 0 otherwise)")
    p.add_argument("--seed", type=int, default=None)


def _sampling(a: argparse.Namespace) -> Sampling:
    min_p = a.min_p if a.min_p is not None else (GUARD_MIN_P if a.length is not None else 0.0)
    return Sampling(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, min_p=min_p, seed=a.seed)


def _load(a: argparse.Namespace):
    from .runtime import load

    _threads(a.threads)
    value_model = getattr(a, "value_model", None)
    gamma = getattr(a, "gamma", None)
    return load(a.model, value_model=value_model, device=a.device, dtype=a.dtype, gamma=gamma)


def _value_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--value-model", required=required,
                   help="LenVM directory (backbone + value_head.safetensors), a value_head.safetensors "
                   "file, or 'default' (the head shipped for the default model)")
    p.add_argument("--gamma", type=float, default=None, help="discount, when the checkpoint does not record it")


def _chat(text: str, raw: bool):
    return text if raw else [{"role": "user", "content": text}]


def cmd_values(a: argparse.Namespace) -> int:
    rt = _load(a)
    tv = rt.token_values(_chat(a.prompt, a.raw), a.response, append_eos=a.ended)
    if a.plot:
        from .plots import plot_token_values

        plot_token_values(tv, a.plot)
    if a.json:
        from dataclasses import asdict

        print(json.dumps(asdict(tv), ensure_ascii=False))
        return 0
    print(f"gamma = {tv.gamma}   predicted length at the prompt boundary = {tv.prompt_remaining:.1f} tokens")
    true = tv.true_remaining or [None] * len(tv.token_ids)
    print(f"{'pos':>4} {'token':<16} {'value':>7} {'remaining':>9} {'true':>5} {'TD':>8}")
    for i, token in enumerate(tv.tokens):
        mark = " +" if tv.td[i] > 0.01 else (" -" if tv.td[i] < -0.01 else "")
        shown = repr(token)[1:-1][:16]
        t = "" if true[i] is None else str(true[i])
        print(f"{i + 1:>4} {shown:<16} {tv.value[i]:>7.4f} {tv.remaining[i]:>9.1f} {t:>5} {tv.td[i]:>8.4f}{mark}")
    if a.plot:
        print(f"wrote {a.plot}", file=sys.stderr)
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    rt = _load(a)
    predicted = rt.predict_length([_chat(p, a.raw) for p in a.prompt])
    if a.json:
        print(json.dumps([{"prompt": p, "predicted_tokens": n} for p, n in zip(a.prompt, predicted)],
                         ensure_ascii=False))
        return 0
    for p, n in zip(a.prompt, predicted):
        print(f"{n:8.1f}  {p}")
    return 0


def _length(a: argparse.Namespace):
    from .config import LengthTarget

    if a.length is None:
        if a.constraint is not None:
            raise ValueError("--constraint needs --length N")
        if a.length_rule is not None:
            raise ValueError("--length-rule needs --length N")
        return None
    return LengthTarget(a.constraint.replace("-", "_") if a.constraint else "equal", a.length, a.length_rule)


def cmd_generate(a: argparse.Namespace) -> int:
    if a.top_logprobs and not a.json:
        raise ValueError("--top-logprobs needs --json")
    sampling = _sampling(a)
    length = _length(a)
    rt = _load(a)
    if a.raw:
        prompt = a.prompt
    else:
        prompt = ([{"role": "system", "content": a.system}] if a.system else []) + [
            {"role": "user", "content": a.prompt}]
    steer = {"length": length, "tilt": a.tilt}
    if a.json:
        gen = rt.generate(prompt, max_new_tokens=a.max_new_tokens, sampling=sampling, top_logprobs=a.top_logprobs,
                          **steer)
        quality = gen.quality
        token_text = rt.tokenizer.token_text
        print(json.dumps({
            "token_ids": gen.token_ids, "text": gen.text, "num_tokens": gen.num_tokens,
            "response_tokens": gen.response_tokens, "finish_reason": gen.finish_reason,
            "prompt_tokens": gen.prompt_tokens, "ms_per_token": gen.ms_per_token,
            "prefill_ms": 1000.0 * gen.prefill_seconds, "values": gen.values, "gamma": rt.gamma,
            "token_logprobs": gen.token_logprobs, "token_ranks": gen.token_ranks,
            "quality": {**quality.fields(), "tokens": quality.tokens},
            **({"top_logprobs": [[{"id": i, "token": token_text(i), "logprob": lp}
                                  for i, lp in top] for top in gen.top_logprobs]} if a.top_logprobs else {}),
        }, ensure_ascii=False))
        return 0
    from tqdm import tqdm

    start, events = time.perf_counter(), []
    bar = tqdm(total=a.max_new_tokens, unit="tok", file=sys.stderr, disable=rt.value is None or a.no_progress,
               desc="generating", leave=False)
    for event in rt.stream(prompt, max_new_tokens=a.max_new_tokens, sampling=sampling, **steer):
        events.append(event)
        if event.remaining is not None:  # the bar's total is the live predicted length
            bar.total = min(a.max_new_tokens, len(events) + round(event.remaining))
        bar.update(1)
        bar.clear()
        sys.stdout.write(event.text)
        sys.stdout.flush()
        bar.refresh()
    bar.close()
    elapsed = time.perf_counter() - start
    summary = _length_and_quality(_streamed_quality(events, rt.eos_token_ids))
    print(f"\n[{summary}, {len(events) / elapsed:.1f} tok/s]", file=sys.stderr)
    return 0


DEMO_PROMPTS = [
    "In one sentence, what is a length value model?",
    "Write a haiku about the sea.",
]
DEMO_GUIDED_PROMPT = "Explain why the sky is blue."
DEMO_TARGETS = (("equal", 16), ("equal", 48), ("at-most", 24), ("at-least", 96))
DEMO_GUIDED_SAMPLING = Sampling(temperature=0, min_p=GUARD_MIN_P)


def _length_and_quality(q: TextQuality) -> str:
    """"N tokens, policy NLL x": the response length (EOS not counted) and the policy's own NLL per token."""
    return f"{q.tokens - q.ended} tokens, policy NLL {q.nll:.2f}"


def _streamed_quality(events: list[StreamEvent], eos_ids: frozenset[int]) -> TextQuality:
    """The quality of a streamed response, from its events' log-probabilities and ranks."""
    from .quality import quality_of_steps

    return quality_of_steps([e.token_id for e in events], [e.logprob for e in events], [e.rank for e in events],
                            eos_ids)


def cmd_demo(a: argparse.Namespace) -> int:
    _threads(a.threads)
    from .config import LengthTarget
    from .default_model import DEFAULT_HEAD_DIR
    from .runtime import load

    guided = a.model == "default" and (DEFAULT_HEAD_DIR / "value_head.safetensors").is_file()
    print(f"loading {a.model} ...", file=sys.stderr)
    rt = load(a.model, value_model="default" if guided else None, device=a.device, dtype=a.dtype)
    print(f"model: {rt.directory}  ({rt.config.num_layers} layers, hidden {rt.config.hidden_size}, "
          f"{rt.device}, {str(rt.dtype).removeprefix('torch.')})\n")
    for text in DEMO_PROMPTS:
        chat = [{"role": "user", "content": text}]
        print(f">>> {text}")
        if guided:
            print(f"[predicted length: {rt.predict_length(chat)[0]:.0f} tokens]")
        start, events = time.perf_counter(), []
        for event in rt.stream(chat, max_new_tokens=a.max_new_tokens, sampling=Sampling(temperature=0)):
            sys.stdout.write(event.text)
            sys.stdout.flush()
            events.append(event)
        elapsed = time.perf_counter() - start
        summary = _length_and_quality(_streamed_quality(events, rt.eos_token_ids))
        print(f"\n[{summary}, finish={events[-1].finish_reason}, {len(events) / elapsed:.1f} tok/s]\n")
    if not guided:
        return 0
    chat = [{"role": "user", "content": DEMO_GUIDED_PROMPT}]
    print(f">>> {DEMO_GUIDED_PROMPT}   (length control with the default value head, γ = {rt.gamma:.4f}, "
          f"candidates: top-15 with min-p {DEMO_GUIDED_SAMPLING.min_p}; NLL: nats per token under the unguided policy)")
    plain = rt.generate(chat, max_new_tokens=2 * a.max_new_tokens, sampling=Sampling(temperature=0))
    print(f"[unguided: {_length_and_quality(plain.quality)}] {plain.text.strip()}\n")
    for constraint, n in DEMO_TARGETS:
        target = {"equal": LengthTarget.equal, "at-most": LengthTarget.at_most, "at-least": LengthTarget.at_least}
        g = rt.generate(chat, max_new_tokens=2 * n + 32, sampling=DEMO_GUIDED_SAMPLING, length=target[constraint](n))
        print(f"[{constraint} {n}: {_length_and_quality(g.quality)}] {g.text.strip()}\n")
    return 0


def cmd_bench_decode(a: argparse.Namespace) -> int:
    from .bench.decode import run

    rt = _load(a)
    results = run(rt, tokens=a.tokens, repeats=a.repeats, model_name=a.model, out=a.out, progress=not a.json)
    if a.json:
        print(json.dumps(results))
    return 0


def cmd_bench_guided(a: argparse.Namespace) -> int:
    from .bench.guided import run

    _threads(a.threads)
    results = run(a.model, tokens=a.tokens, repeats=a.repeats, out=a.out, device=a.device, progress=not a.json)
    if a.json:
        print(json.dumps(results))
    return 0


def cmd_bench_value_head(a: argparse.Namespace) -> int:
    from .bench.value_head import run

    _threads(a.threads)
    results = run(a.model, steps=a.steps, repeats=a.repeats, device=a.device, out=a.out)
    if a.json:
        print(json.dumps(results))
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .server.app import create_app
        from .server.engine import Engine
    except ImportError as exc:
        raise RuntimeError(f"serving needs the serve extra: pip install 'lenvm_rt[serve]' ({exc})") from None
    rt = _load(a)
    engine = Engine(rt, max_batch=a.max_batch, max_queue=a.max_queue)
    name = a.served_model_name or a.model
    print(f"serving {name} on http://{a.host}:{a.port} (value model: {rt.value is not None})", file=sys.stderr)
    uvicorn.run(create_app(engine, name), host=a.host, port=a.port, log_level=a.log_level, ws="none")
    return 0


def cmd_bench_serve(a: argparse.Namespace) -> int:
    from .bench.serve import run

    rt = _load(a)
    results = run(rt, model_name=a.model, streams=a.streams, requests=a.requests, tokens=a.tokens,
                  max_batch=a.max_batch, out=a.out)
    if a.json:
        print(json.dumps(results))
    return 0


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-batch", type=int, default=16, help="rows of the running decode batch")
    p.add_argument("--max-queue", type=int, default=64, help="requests held (running + waiting); more get 429")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lenvm-rt", description="Length Value Model runtime")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the embedded default model end to end")
    _model_args(demo)
    demo.add_argument("--max-new-tokens", type=int, default=96)
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser("generate", help="generate from one prompt")
    _model_args(gen)
    _sampling_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--system", default=None, help="system message (chat mode)")
    gen.add_argument("--raw", action="store_true", help="encode the prompt as plain text, no chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    gen.add_argument("--top-logprobs", type=int, default=0, metavar="N",
                     help="with --json: each step's N most probable tokens (0-20) under the policy")
    _value_args(gen, required=False)
    gen.add_argument("--length", type=int, default=None, help="length target N in response tokens (EOS not counted)")
    gen.add_argument("--constraint", choices=["equal", "at-most", "at-least"], default=None,
                     help="how --length binds (default: equal)")
    gen.add_argument("--length-rule", choices=["strict", "band", "soft"], default=None,
                     help="strict = the paper's rule (equal: closest predicted length; at-most: shortest; "
                          "at-least: longest, then shortest); band = follow the policy among the candidates the "
                          "target allows (equal: within max(2, 25%%) tokens of it; at-most: predicted to fit; "
                          "at-least: predicted to reach it); soft (equal only) = sample from the value-tilted "
                          "distribution whose expected value is the target's (default: band)")
    gen.add_argument("--tilt", type=float, default=None, help="exponential tilt β: < 0 shorter, > 0 longer")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen.set_defaults(func=cmd_generate)

    values = sub.add_parser("values", help="per-token values, predicted remaining tokens and TD residuals")
    _model_args(values)
    _value_args(values, required=True)
    values.add_argument("--prompt", required=True)
    values.add_argument("--response", required=True)
    values.add_argument("--ended", action="store_true", help="the response is finished: append EOS")
    values.add_argument("--raw", action="store_true", help="prompt is plain text, no chat template")
    values.add_argument("--plot", default=None, help="write a PNG of predicted vs true remaining tokens")
    values.add_argument("--json", action="store_true")
    values.set_defaults(func=cmd_values)

    predict = sub.add_parser("predict", help="predicted generation length from the prompt")
    _model_args(predict)
    _value_args(predict, required=True)
    predict.add_argument("--prompt", required=True, action="append", help="repeat for a batch")
    predict.add_argument("--raw", action="store_true", help="prompts are plain text, no chat template")
    predict.add_argument("--json", action="store_true")
    predict.set_defaults(func=cmd_predict)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    dec = bench_sub.add_parser("decode", help="per-token decode time vs transformers and the weight-read floor")
    _model_args(dec)
    dec.add_argument("--tokens", type=int, default=64)
    dec.add_argument("--repeats", type=int, default=5)
    dec.add_argument("--out", default="benchmarks/results/bench_decode.json")
    dec.add_argument("--json", action="store_true", help="print the results as JSON")
    dec.set_defaults(func=cmd_bench_decode)
    gui = bench_sub.add_parser("guided", help="guided vs plain decoding, both configurations, vs the reference method")
    _model_args(gui)
    gui.add_argument("--tokens", type=int, default=32)
    gui.add_argument("--repeats", type=int, default=3)
    gui.add_argument("--out", default="benchmarks/results/bench_guided.json")
    gui.add_argument("--json", action="store_true", help="print the results as JSON")
    gui.set_defaults(func=cmd_bench_guided)
    vh = bench_sub.add_parser("value-head", help="cost of the value read on top of a plain decode step")
    _model_args(vh)
    vh.add_argument("--steps", type=int, default=64)
    vh.add_argument("--repeats", type=int, default=3)
    vh.add_argument("--out", default="benchmarks/results/bench_value_head.json")
    vh.add_argument("--json", action="store_true", help="print the results as JSON")
    vh.set_defaults(func=cmd_bench_value_head)
    bs = bench_sub.add_parser("serve", help="the server engine: throughput, TTFT and ITL at 1/4/16 concurrent streams")
    _model_args(bs)
    _value_args(bs, required=False)
    bs.add_argument("--streams", default="1,4,16", help="concurrent streams, comma-separated")
    bs.add_argument("--requests", type=int, default=16, help="requests per concurrency level (at least the streams)")
    bs.add_argument("--tokens", type=int, default=32, help="max tokens per request")
    bs.add_argument("--max-batch", type=int, default=16)
    bs.add_argument("--out", default="benchmarks/results/bench_serve.json")
    bs.add_argument("--json", action="store_true", help="print the results as JSON")
    bs.set_defaults(func=cmd_bench_serve)
    serve = sub.add_parser("serve", help="OpenAI-compatible, length-aware HTTP server with continuous batching")
    _model_args(serve)
    _value_args(serve, required=False)
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _serve_args(serve)
    serve.set_defaults(func=cmd_serve)
    add_training_commands(sub)
    ev = sub.add_parser("eval", help="evaluation suites (lifebench, tradeoff, mre, length-tokens, report, ...)")
    eval_sub = ev.add_subparsers(dest="eval", required=True)
    add_eval_commands(eval_sub)
    add_lifebench_command(eval_sub)
    add_report_command(eval_sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

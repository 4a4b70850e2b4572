"""`lenvm-rt eval` commands (LENVM.md §5–§7): the trade-off, prompt-boundary MRE, length tokens, test problems.

    lenvm-rt eval tradeoff --value-model P --data FILE [--betas=0,-20,-50,-100,-1000] [--budgets 64,128,256]
                                                       [--at-most 128,256]
                           [--samples N] [--limit K] [--max-new-tokens N] [--out DIR]
    lenvm-rt eval mre --value-model P --data FILE [--samples N] [--limit K] [--max-tokens N] [--out DIR]
    lenvm-rt eval length-tokens --value-model P --data FILE [--samples N] [--threshold 0.01] [--top 20] [--out DIR]
    lenvm-rt eval make-arithmetic --out FILE [--n 200] [--seed 0]

cli.py wires the group: `add_eval_commands(sub.add_parser("eval", ...).add_subparsers(dest="eval", required=True))`.
Each run prints a table (or, with --json, one JSON line) and writes JSON + PNG under --out; rerunning the
same command resumes. Malformed data lines are reported on stderr as `warning: FILE:LINE: ...` and skipped;
bad arguments raise ValueError, which cli.main prints as `error: ...` with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

_LISTS = ("samples", "per_prompt", "per_token")  # left out of --json output (they are in the JSON file)


def _warn(errors: Sequence[str]) -> None:
    for e in errors:
        print(f"warning: skipped {e}", file=sys.stderr)


def _report(a: argparse.Namespace, record: dict[str, Any], table: str, files: Sequence[str]) -> int:
    if a.json:
        print(json.dumps({"out": a.out, **{k: v for k, v in record["results"].items() if k not in _LISTS}},
                         ensure_ascii=False))
    else:
        print(table)
    print("wrote " + ", ".join(f"{a.out}/{f}" for f in files), file=sys.stderr)
    return 0


def cmd_tradeoff(a: argparse.Namespace) -> int:
    from .cli import _load
    from .eval.tradeoff import TradeoffSettings, load_questions, parse_betas, parse_budgets, run_tradeoff, table

    at_most = tuple(parse_budgets(a.at_most, "--at-most")) if a.at_most else ()
    settings = TradeoffSettings(betas=tuple(parse_betas(a.betas)), budgets=tuple(parse_budgets(a.budgets)),
                                at_most=at_most, at_most_rule=a.at_most_rule,
                                samples=a.samples, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                                top_p=a.top_p, min_p=a.min_p, top_k=a.top_k, batch=a.batch, seed=a.seed)
    settings.check()
    rows = load_questions(a.data, limit=a.limit)
    _warn(rows.errors)
    record = run_tradeoff(_load(a), rows.items, a.out, settings, progress=not a.no_progress, skipped=rows.errors,
                          data=str(a.data))
    return _report(a, record, table(record["results"]), ["tradeoff.json", "tradeoff.png", "tradeoff_samples.jsonl"])


def cmd_mre(a: argparse.Namespace) -> int:
    from .cli import _load
    from .eval.data import read_records
    from .eval.mre import MRESettings, run_mre, table

    settings = MRESettings(samples=a.samples, max_tokens=a.max_tokens, batch=a.batch, seed=a.seed,
                           positions=not a.no_positions)
    settings.check()
    rows = read_records(a.data, raw=a.raw, limit=a.limit)
    _warn(rows.errors)
    record = run_mre(_load(a), rows.items, a.out, settings, progress=not a.no_progress, skipped=rows.errors)
    return _report(a, record, table(record["results"]), ["mre.json", "mre.png"])


def cmd_length_tokens(a: argparse.Namespace) -> int:
    from .cli import _load
    from .eval.length_tokens import LengthTokenSettings, load_completions, run_length_tokens, table

    settings = LengthTokenSettings(samples=a.samples, max_tokens=a.max_tokens, threshold=a.threshold, top=a.top,
                                   batch=a.batch, seed=a.seed)
    settings.check()
    rows = load_completions(a.data, limit=a.limit, raw=a.raw)
    _warn(rows.errors)
    record = run_length_tokens(_load(a), rows.items, a.out, settings, progress=not a.no_progress,
                               skipped=rows.errors)
    return _report(a, record, table(record["results"]), ["length_tokens.json", "length_tokens.png"])


def cmd_make_arithmetic(a: argparse.Namespace) -> int:
    from .eval.arithmetic import make_problems, write_problems

    problems = make_problems(a.n, seed=a.seed, two_step_share=a.two_step_share, max_operand=a.max_operand)
    path = write_problems(problems, a.out)
    print(json.dumps({"out": str(path), "problems": a.n, "seed": a.seed}))
    return 0


def _common(p: argparse.ArgumentParser, *, out: str, samples: int, samples_help: str) -> None:
    from .cli import _model_args, _value_args

    _model_args(p)
    _value_args(p, required=True)
    p.add_argument("--data", required=True, help="JSONL input (malformed lines are reported and skipped)")
    p.add_argument("--samples", type=int, default=samples, help=samples_help)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first K usable rows")
    p.add_argument("--out", default=out, help=f"output directory; rerun the same command to resume (default {out})")
    p.add_argument("--batch", type=int, default=16, help="rows decoded together")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (per question and sample)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as one line of JSON")


def add_eval_commands(sub: Any) -> None:
    """Register tradeoff, mre, length-tokens and make-arithmetic on the `eval` group's subparsers."""
    tr = sub.add_parser("tradeoff", help="pass@1 vs mean tokens: value tilting per β against hard token budgets")
    _common(tr, out="eval_results/tradeoff", samples=8, samples_help="samples per question and setting")
    tr.add_argument("--betas", default="0,-20,-50,-100,-1000",
                    help="tilt strengths β <= 0, comma-separated; write --betas=-20,-50 when the list starts with -")
    tr.add_argument("--budgets", default="64,128,256", help="hard token budgets (EOS counted), comma-separated")
    tr.add_argument("--at-most", default="",
                    help="also decode with LengthTarget.at_most(N) for each N (comma-separated), each against the "
                         "unguided run truncated at N")
    tr.add_argument("--at-most-rule", choices=["strict", "band"], default="band",
                    help="rule of the --at-most rows: strict (the paper's shortest continuation) or band (the "
                         "policy's own choice among the candidates predicted to fit) (default: %(default)s)")
    tr.add_argument("--max-new-tokens", type=int, default=512, help="cap for every sample; a cut response is wrong")
    tr.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (paper: 1.0)")
    tr.add_argument("--top-p", type=float, default=1.0)
    tr.add_argument("--min-p", type=float, default=0.01, help="paper App. A: 0.01")
    tr.add_argument("--top-k", type=int, default=None, help="tilted rows' candidates (default: the runtime's 15)")
    tr.set_defaults(func=cmd_tradeoff)

    mre = sub.add_parser("mre", help="prompt-boundary length prediction error against sampled completions")
    _common(mre, out="eval_results/mre", samples=8, samples_help="completions per prompt (paper: 64)")
    mre.add_argument("--max-tokens", type=int, default=512, help="cap per completion; cut ones count with the cap")
    mre.add_argument("--raw", action="store_true", help="'prompt' text is encoded as is, without the chat template")
    mre.add_argument("--no-positions", action="store_true", help="skip the errors along each completion")
    mre.set_defaults(func=cmd_mre)

    lt = sub.add_parser("length-tokens", help="tokens whose TD residual lengthens or shortens the prediction")
    _common(lt, out="eval_results/length-tokens", samples=1,
            samples_help="completions sampled per prompt row without a 'response'")
    lt.add_argument("--max-tokens", type=int, default=512, help="cap per sampled completion")
    lt.add_argument("--threshold", type=float, default=0.01, help="|δ| above this counts (paper: 0.01)")
    lt.add_argument("--top", type=int, default=20, help="tokens listed per direction")
    lt.add_argument("--raw", action="store_true", help="'prompt' text is encoded as is, without the chat template")
    lt.set_defaults(func=cmd_length_tokens)

    ar = sub.add_parser("make-arithmetic", help="write one- and two-step arithmetic word problems (GSM8K format)")
    ar.add_argument("--out", required=True, help="output JSONL file")
    ar.add_argument("--n", type=int, default=200, help="number of problems")
    ar.add_argument("--seed", type=int, default=0)
    ar.add_argument("--two-step-share", type=float, default=0.5, help="share of two-step problems")
    ar.add_argument("--max-operand", type=int, default=20, help="largest operand (smaller: easier problems)")
    ar.set_defaults(func=cmd_make_arithmetic)

"""`lenvm-rt eval lifebench`: the token-level LIFEBench protocol (LENVM.md §7.1) on the command line.

    lenvm-rt eval lifebench --data FILE [--targets 32,64,128,256,512,1024]
        [--constraints equal,at-most,at-least] [--no-guidance] [--model M] [--value-model V]
        [--out DIR] [--limit N] [--max-new-tokens-factor F] [--batch B] [--json]

Guided runs need --value-model; --no-guidance runs the same prompts without one. Rerunning the same
command resumes from the per-unit results in --out. Arguments and the data file are checked before
the model loads; bad ones raise ValueError / FileNotFoundError, which `lenvm-rt` prints as one
`error: ...` line with exit status 2. Malformed data lines are reported with their line numbers and
the rest is evaluated.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .config import DEFAULT_RULES


def cmd_lifebench(a: argparse.Namespace) -> int:
    from .config import Sampling
    from .eval.lifebench import (
        every_kth_unit,
        format_summary,
        parse_constraints,
        parse_targets,
        read_units,
        run_lifebench,
    )

    targets = parse_targets(a.targets)
    constraints = parse_constraints(a.constraints)
    if a.limit is not None and a.limit < 1:
        raise ValueError(f"--limit must be >= 1; got {a.limit}")
    if not a.max_new_tokens_factor >= 1.0:
        raise ValueError(f"--max-new-tokens-factor must be >= 1; got {a.max_new_tokens_factor}")
    if a.batch < 1:
        raise ValueError(f"--batch must be >= 1; got {a.batch}")
    guided = not a.no_guidance
    if guided and a.value_model is None:
        raise ValueError("a guided LIFEBench run needs --value-model; --no-guidance runs the baseline without one")
    sampling = Sampling(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p, seed=a.seed)
    units, malformed = read_units(a.data)
    for bad in malformed:
        print(f"warning: {a.data}:{bad['line']}: {bad['error']}; line skipped", file=sys.stderr)
    units = every_kth_unit(units, a.every)
    if a.limit is not None:
        units = units[:a.limit]

    from .cli import _threads
    from .runtime import load

    _threads(a.threads)
    rt = load(a.model, value_model=a.value_model if guided else None, device=a.device, dtype=a.dtype,
              gamma=a.gamma if guided else None)
    record = run_lifebench(rt, units, targets, constraints, guided, a.out, sampling=sampling,
                           max_new_tokens_factor=a.max_new_tokens_factor, batch_size=a.batch, data_path=a.data,
                           malformed=malformed, progress=not (a.no_progress or a.json),
                           rules={"equal": a.length_rule, "at_most": a.at_most_rule, "at_least": a.at_least_rule})
    if a.json:
        print(json.dumps(record, ensure_ascii=False))
    else:
        print(format_summary(record))
    print(f"wrote {a.out}: per-unit results, summary JSON and lifebench_scores.png", file=sys.stderr)
    return 0


def add_lifebench_command(eval_subparsers: Any) -> argparse.ArgumentParser:
    """Add `lifebench` to the subparsers of an `eval` command group; returns its parser."""
    from .cli import _model_args, _value_args

    p = eval_subparsers.add_parser("lifebench", help="LIFEBench length following, counted in tokens (resumable)")
    _model_args(p)
    _value_args(p, required=False)
    p.add_argument("--data", required=True, help="LIFEBench JSONL (id, category, type, lang, task, raw_data)")
    p.add_argument("--targets", default="32,64,128,256,512,1024", help="comma-separated target lengths in tokens")
    p.add_argument("--constraints", default="equal,at-most,at-least",
                   help="comma-separated subset of equal, at-most, at-least")
    p.add_argument("--no-guidance", action="store_true", help="baseline: the same prompts without a value model")
    p.add_argument("--out", default="eval_results/lifebench",
                   help="output directory; rerun the same command to resume (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N valid units")
    p.add_argument("--every", type=int, default=1,
                   help="a stratified 1/K subset: every K-th unit of each category and language, in id order")
    p.add_argument("--max-new-tokens-factor", type=float, default=2.0,
                   help="cap = ceil(F*N)+32 for equal/at-most, ceil(2F*N)+32 for at-least (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="prompts decoded together (default: %(default)s)")
    p.add_argument("--length-rule", choices=["strict", "band", "soft"], default=DEFAULT_RULES["equal"],
                   help="Equal-To rule of guided runs: strict argmin (the paper's), the tolerance band, or soft "
                        "(the tilt that hits the target in expectation) (default: %(default)s)")
    for c in ("at_most", "at_least"):
        p.add_argument(f"--{c.replace('_', '-')}-rule", choices=["strict", "band"], default=DEFAULT_RULES[c],
                       help=f"{c.replace('_', '-')} rule of guided runs: strict (the paper's) or band (the policy's "
                            "own choice among the candidates predicted to fit / reach the target) "
                            "(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="also the guided candidate count (default 15)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary record as one line of JSON")
    p.set_defaults(func=cmd_lifebench)
    return p

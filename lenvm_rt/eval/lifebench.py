"""LIFEBench at the token level (LENVM.md §7.1): prompts, guided and unguided runs, resumable results.

    units, malformed = read_units("data_lite.jsonl")     # malformed: [{"line", "error"}], the rest kept
    record = run_lifebench(runtime, units, targets=[32, 64], constraints=["equal", "at-most"], guided=True,
                           out_dir="out")                 # the JSON summary record, also written to out/
    print(format_summary(record))

Contract:
- Prompt: the unit's `task` with its `{word_count_type}` / `{word_count}` requirement stated in tokens,
  in English for `en` units and Chinese for `cn` units (WORDING), behind USER_PREFIX, sent as one
  chat user message. The guided and unguided runs send identical prompts.
- Length L: response tokens of the policy, EOS not counted; scored by `lifebench_score`.
- Guided runs decode with `length=LengthTarget.<constraint>(N)` and need a value model; greedy by default.
- max_new_tokens: ceil(F·N) + 32 for equal / at-most, ceil(2F·N) + 32 for at-least (F =
  max_new_tokens_factor, default 2). At default F a truncated equal / at-most output has LD ≥ 1, where
  the score is at most 13.5, so truncation moves a score by no more than that; any cap ≥ N scores
  at-least exactly. Truncated outputs are counted. The cap shrinks to the context left after the prompt;
  a unit whose prompt leaves fewer than N + 1 tokens is skipped for that target and counted.
- Output in out_dir: lifebench_{guided|unguided}.jsonl (one record per (unit, constraint, target) cell,
  appended as batches finish; a rerun skips cells already there and refuses a file written with other
  settings), lifebench_{guided|unguided}.json (summary with machine and versions) and lifebench_scores.png
  (score per target, one line per constraint and mode present in out_dir).
- Quality: every output that ran carries nll, mean_rank, mean_prob and repetition_rate (lenvm_rt/quality.py:
  the unguided policy's own judgement of the response, EOS included); summaries hold their means per cell and
  per constraint. Records from before these fields existed are kept on resume and left out of the means
  (each mean says how many outputs it covers, quality_n / n).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..bench.report import write_record
from ..config import DEFAULT_RULES, LengthTarget, Sampling
from ..quality import generation_fields
from .lifebench_score import (
    CONSTRAINTS,
    K1,
    K2,
    MODES,
    format_summary,
    is_filtered,
    length_deviation,
    length_score,
    normalize_constraint,
    plot_scores,
    summarize,
)

__all__ = ["USER_PREFIX", "WORDING", "Unit", "build_prompt", "format_summary", "length_deviation", "length_score",
           "max_new_tokens_for", "parse_constraints", "parse_targets", "plot_scores", "read_units", "run_lifebench"]

USER_PREFIX = "Please follow the instructions below.\n\n"
WORDING = {
    "en": {"equal": "equal to", "at_most": "at most", "at_least": "at least", "unit": "tokens"},
    "cn": {"equal": "等于", "at_most": "至多有", "at_least": "至少有", "unit": "个token"},
}
GREEDY = Sampling(temperature=0.0)
PAD_TOKENS = 32


@dataclass(frozen=True)
class Unit:
    """One LIFEBench instruction: `task` holds the {word_count_type} and {word_count} placeholders."""

    id: str
    lang: str
    task: str
    category: str = ""
    type: str = ""

    @staticmethod
    def from_dict(row: Mapping[str, Any]) -> Unit:
        """Validate a data row; ValueError names the missing or bad field."""
        if not isinstance(row, Mapping):
            raise ValueError(f"expected a JSON object; got {type(row).__name__}")
        uid = row.get("id")
        if isinstance(uid, bool) or not isinstance(uid, (int, str)) or str(uid) == "":
            raise ValueError(f"'id' must be an int or a non-empty string; got {uid!r}")
        lang = row.get("lang")
        if lang not in WORDING:
            raise ValueError(f"'lang' must be 'en' or 'cn'; got {lang!r}")
        task = row.get("task")
        if not isinstance(task, str) or "{word_count_type}" not in task or "{word_count}" not in task:
            raise ValueError("'task' must be a string holding the {word_count_type} and {word_count} placeholders")
        return Unit(id=str(uid), lang=lang, task=task, category=str(row.get("category", "")),
                    type=str(row.get("type", "")))


def every_kth_unit(units: Sequence[Unit], k: int) -> list[Unit]:
    """A stratified 1/k subset: units 0, k, 2k, … of each (category, language) group in id order, in id order."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"every must be an int >= 1; got {k!r}")
    if k == 1:
        return list(units)

    def order(u: Unit) -> tuple[int, str]:
        return (int(u.id), "") if u.id.isdigit() else (0, u.id)

    groups: dict[tuple[str, str], list[Unit]] = {}
    for u in units:
        groups.setdefault((u.category, u.lang), []).append(u)
    return sorted((u for g in groups.values() for u in sorted(g, key=order)[::k]), key=order)


def read_units(path: str | Path) -> tuple[list[Unit], list[dict[str, Any]]]:
    """Units of a LIFEBench JSONL file and its malformed lines ({"line": 1-based number, "error"}).

    FileNotFoundError when the file is missing; ValueError when no line holds a valid unit.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"LIFEBench data file {str(path)!r} does not exist")
    units: list[Unit] = []
    malformed: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, raw in enumerate(p.read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            unit = Unit.from_dict(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
            malformed.append({"line": number, "error": str(exc)})
            continue
        if unit.id in seen:
            malformed.append({"line": number, "error": f"duplicate id {unit.id!r}"})
            continue
        seen.add(unit.id)
        units.append(unit)
    if not units:
        raise ValueError(f"{p}: no valid LIFEBench units ({len(malformed)} malformed lines)")
    return units, malformed


def parse_targets(spec: str | Iterable[int]) -> list[int]:
    """'32,64,128' or a list of ints -> positive, distinct, ascending targets; ValueError otherwise."""
    items = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    if not items:
        raise ValueError("the target list is empty; pass e.g. --targets 32,64,128")
    targets: list[int] = []
    for item in items:
        try:
            value = int(item) if isinstance(item, str) else item
        except ValueError:
            raise ValueError(f"targets must be positive ints; got {item!r}") from None
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"targets must be positive ints; got {item!r}")
        targets.append(value)
    return sorted(set(targets))


def parse_constraints(spec: str | Iterable[str]) -> list[str]:
    """'equal,at-most,at-least' (or a list) -> distinct constraints in LengthTarget spelling."""
    items = [s for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    if not items:
        raise ValueError("the constraint list is empty; pass e.g. --constraints equal,at-most,at-least")
    kinds = {normalize_constraint(item) for item in items}
    return [c for c in CONSTRAINTS if c in kinds]


def build_prompt(task: str, lang: str, constraint: str, target: int) -> str:
    """The task with its length requirement filled in and stated in tokens, in the unit's language."""
    words = WORDING.get(lang)
    if words is None:
        raise ValueError(f"lang must be 'en' or 'cn'; got {lang!r}")
    kind = normalize_constraint(constraint)
    amount = f"{target} {words['unit']}"
    if lang == "en":
        text = re.sub(r"\{word_count\}\s+words?\b", amount, task)
    else:
        head, mark, requirement = task.rpartition("[要求]")
        text = head + mark + re.sub(r"\{word_count\}\s*字", amount, requirement.replace("字数", "token数"))
    return text.replace("{word_count}", amount).replace("{word_count_type}", words[kind])


def max_new_tokens_for(constraint: str, target: int, factor: float = 2.0) -> int:
    """Generation cap of one cell before the context limit: see the module contract."""
    if not factor >= 1.0:
        raise ValueError(f"max_new_tokens_factor must be >= 1; got {factor!r}")
    scale = 2.0 * factor if normalize_constraint(constraint) == "at_least" else factor
    return math.ceil(scale * target) + PAD_TOKENS


def _settings(runtime: Any, guided: bool, sampling: Sampling, factor: float, user_prefix: str,
              rules: Mapping[str, str]) -> dict[str, Any]:
    value = runtime.value if guided else None
    # The rules matter to guided runs only; the At Most / At Least rules are recorded when they are not the
    # paper's (strict), so that runs from before they were selectable keep their fingerprint.
    rule = {"equal_rule": rules["equal"]} if guided else {}
    if guided:
        rule.update({f"{c}_rule": rules[c] for c in ("at_most", "at_least") if rules[c] != "strict"})
    return {
        **rule,
        "model": str(Path(runtime.directory).resolve()),
        "value_model": str(Path(value.source.head_file).resolve()) if value is not None else None,
        "gamma": value.gamma if value is not None else None,
        "guided": guided,
        "sampling": asdict(sampling),
        "max_new_tokens_factor": factor,
        "max_context": runtime.max_context,
        "user_prefix": user_prefix,
        "wording": WORDING,
    }


def _fingerprint(settings: Mapping[str, Any]) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]


def _cell_key(record: Mapping[str, Any]) -> tuple[str, str, int]:
    return str(record["id"]), str(record["constraint"]), int(record["target"])


def _read_results(path: Path, run: str) -> tuple[dict[tuple[str, str, int], dict[str, Any]], int]:
    """Records already in `path` by cell, and the number of unreadable lines (a cut-off last write)."""
    done: dict[tuple[str, str, int], dict[str, Any]] = {}
    ignored = 0
    if not path.is_file():
        return done, ignored
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key = _cell_key(record)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            ignored += 1
            continue
        if record.get("run") != run:
            raise ValueError(f"{path} holds results of a run with other settings (model, value model, sampling, "
                             "cap or context); pass another --out or remove that file")
        done[key] = record
    return done, ignored


def _ends_torn(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) != b"\n"


def _append(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    needs_newline = _ends_torn(path)  # close a cut-off last line so that it stays one ignored line
    with path.open("a", encoding="utf-8") as f:
        if needs_newline:
            f.write("\n")
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _record(unit: Unit, constraint: str, target: int, guided: bool, run: str, prompt_tokens: int,
            cap: int, capped: bool) -> dict[str, Any]:
    return {"id": unit.id, "category": unit.category, "type": unit.type, "lang": unit.lang,
            "constraint": constraint, "target": target, "guided": guided, "run": run,
            "prompt_tokens": prompt_tokens, "max_new_tokens": cap, "context_capped": capped, "skipped": None}


def _run_cell(runtime: Any, units: Sequence[Unit], constraint: str, target: int, *, guided: bool,
              sampling: Sampling, factor: float, batch_size: int, user_prefix: str, run: str, path: Path,
              bar: Any, rules: Mapping[str, str] = DEFAULT_RULES) -> list[dict[str, Any]]:
    """Decode one (constraint, target) cell for `units`, appending each batch's records to `path`."""
    cap = max_new_tokens_for(constraint, target, factor)
    out: list[dict[str, Any]] = []
    by_cap: dict[int, list[tuple[Unit, list[int]]]] = {}
    for unit in units:
        prompt = user_prefix + build_prompt(unit.task, unit.lang, constraint, target)
        ids = runtime.encode([{"role": "user", "content": prompt}])
        room = runtime.max_context - len(ids)
        if room < target + 1:
            record = _record(unit, constraint, target, guided, run, len(ids), max(room, 0), True)
            record["skipped"] = (f"prompt of {len(ids)} tokens leaves {max(room, 0)} of the {runtime.max_context}"
                                 f"-token context; the target needs {target + 1}")
            out.append(record)
            _append(path, [record])
            bar.update(1)
        else:
            by_cap.setdefault(min(cap, room), []).append((unit, ids))
    length = LengthTarget(constraint, target, rules[constraint]) if guided else None
    for row_cap, rows in sorted(by_cap.items(), reverse=True):
        rows.sort(key=lambda row: len(row[1]))  # similar prompt lengths share a batch: little padding
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            gens = runtime.generate_batch([ids for _, ids in chunk], max_new_tokens=row_cap, sampling=sampling,
                                          length=length)
            quality = [generation_fields(g, runtime.eos_token_ids) for g in gens]
            batch = []
            for (unit, ids), gen, q in zip(chunk, gens, quality):
                record = _record(unit, constraint, target, guided, run, len(ids), row_cap, row_cap < cap)
                n = gen.num_tokens - 1 if gen.finish_reason == "stop" else gen.num_tokens
                deviation = length_deviation(n, target)
                filtered = is_filtered(n)
                record.update(text=gen.text, length=n, num_tokens=gen.num_tokens, finish_reason=gen.finish_reason,
                              deviation=deviation, filtered=filtered,
                              score=None if filtered else length_score(deviation, constraint), **q)
                batch.append(record)
            _append(path, batch)
            out.extend(batch)
            bar.update(len(chunk))
    return out


def run_lifebench(runtime: Any, units: Sequence[Unit | Mapping[str, Any]], targets: str | Iterable[int],
                  constraints: str | Iterable[str], guided: bool, out_dir: str | Path, *,
                  sampling: Sampling = GREEDY, max_new_tokens_factor: float = 2.0, batch_size: int = 8,
                  user_prefix: str = USER_PREFIX, data_path: str | Path | None = None,
                  malformed: Sequence[Mapping[str, Any]] = (), progress: bool = True,
                  rules: Mapping[str, str | None] | None = None) -> dict[str, Any]:
    """Evaluate every (unit, constraint, target) cell not yet in out_dir; return the summary record.

    rules: the rule of guided runs per constraint ("equal", "at_most", "at_least" -> "strict" | "band" | "soft",
    LengthTarget.rule); a constraint left out or None takes its DEFAULT_RULES entry.

    runtime is a `lenvm_rt.Runtime` (with a value model when guided). malformed lists the data file's
    bad lines for the report. ValueError on bad arguments, before any decoding.
    """
    from tqdm import tqdm

    began = time.perf_counter()
    target_list = parse_targets(targets)
    constraint_list = parse_constraints(constraints)
    unit_list = [u if isinstance(u, Unit) else Unit.from_dict(u) for u in units]
    if not unit_list:
        raise ValueError("no LIFEBench units to evaluate")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
    if not isinstance(sampling, Sampling):
        raise ValueError(f"sampling must be a Sampling; got {type(sampling).__name__}")
    max_new_tokens_for("equal", 1, max_new_tokens_factor)
    if guided and runtime.value is None:
        raise ValueError("a guided LIFEBench run needs a value model (--value-model); --no-guidance runs the "
                         "baseline without one")
    unknown = set(rules or {}) - set(DEFAULT_RULES)
    if unknown:
        raise ValueError(f"rules: unknown constraint {sorted(unknown)[0]!r}; expected {', '.join(DEFAULT_RULES)}")
    chosen = {c: (rules or {}).get(c) or DEFAULT_RULES[c] for c in DEFAULT_RULES}
    for c, rule in chosen.items():
        LengthTarget(c, 1, rule)  # ValueError for an unknown or misplaced rule, before any work
    settings = _settings(runtime, guided, sampling, max_new_tokens_factor, user_prefix, chosen)
    run = _fingerprint(settings)
    mode = MODES[0] if guided else MODES[1]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / f"lifebench_{mode}.jsonl"
    done, ignored = _read_results(results_path, run)
    cells = [(c, t, u) for c in constraint_list for t in target_list for u in unit_list]
    todo: dict[tuple[str, int], list[Unit]] = {}
    for c, t, u in cells:
        if (u.id, c, t) not in done:
            todo.setdefault((c, t), []).append(u)
    pending = sum(len(v) for v in todo.values())
    with tqdm(total=len(cells), initial=len(cells) - pending, unit="cell", desc=f"LIFEBench {mode}",
              file=sys.stderr, disable=not progress) as bar:
        for (c, t), group in todo.items():
            for record in _run_cell(runtime, group, c, t, guided=guided, sampling=sampling,
                                    factor=max_new_tokens_factor, batch_size=batch_size, user_prefix=user_prefix,
                                    run=run, path=results_path, bar=bar, rules=chosen):
                done[_cell_key(record)] = record
    records = [done[(u.id, c, t)] for c, t, u in cells]
    results = summarize(records, constraint_list, target_list)
    results["skipped_units"] = [{"id": r["id"], "constraint": r["constraint"], "target": r["target"],
                                 "reason": r["skipped"]} for r in records if r["skipped"]]
    results["malformed_lines"] = [dict(m) for m in malformed]
    results["ignored_result_lines"] = ignored
    results["evaluated_now"] = pending
    results["elapsed_seconds"] = round(time.perf_counter() - began, 3)
    config = {
        **settings,
        "data": str(data_path) if data_path is not None else None,
        "units": len(unit_list),
        "targets": target_list,
        "constraints": constraint_list,
        "batch_size": batch_size,
        "device": str(runtime.device),
        "dtype": str(runtime.dtype).removeprefix("torch."),
        "max_new_tokens_rule": f"ceil(F*N)+{PAD_TOKENS} for equal/at_most, ceil(2F*N)+{PAD_TOKENS} for at_least, "
                               "F = max_new_tokens_factor, capped by the context left after the prompt",
        "length_counter": "response tokens of the policy, EOS not counted",
        "scoring": {"deviation": "(L - N) / N as a fraction", "k1": K1, "k2": K2,
                    "filter": "outputs of length <= 1 dropped", "aggregation": "mean per target rounded to 0.1, "
                    "then mean over targets with scored outputs"},
        "quality": "policy's own mean NLL / rank / probability per token (EOS included, temperature 1, no "
                   "filters) and the share of repeated token 4-grams, per output; means per output that ran",
        "run": run,
        "results_file": str(results_path),
    }
    record = write_record(out / f"lifebench_{mode}.json", "lifebench", config, results)
    plot_scores(out)
    return record

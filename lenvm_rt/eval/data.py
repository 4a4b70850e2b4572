"""Evaluation inputs: JSONL records with line-numbered errors, and the prompt forms the eval commands accept.

    rows = read_records("data.jsonl", raw=False, check=None)   # Rows: items [Record], errors ["FILE:LINE: why"]
    record.id, record.line, record.prompt, record.row           # prompt: text or chat messages for Runtime

A row's prompt is, in this order of precedence:
  "messages"  a list of chat messages ({"role", "content"}), rendered with the policy's chat template;
  "prompt"    text, sent as one user message (with raw=True: encoded as is, no chat template);
  "question"  a GSM8K question, wrapped in the math template of LENVM.md §3 and sent as a user message.
The id is the row's "id" or, without one, its line number.

Contract: a malformed line (not JSON, not an object, no usable prompt, a duplicate id, or rejected by `check`
with ValueError) is reported as "FILE:LINE: reason" and skipped; the rest is evaluated. A missing file raises
FileNotFoundError; a file with no usable record raises ValueError listing the first errors.

Also shared by the eval commands: append_jsonl / read_samples (the resumable per-sample logs; a torn last
line from an interrupted run is ignored), pyplot() (matplotlib on the headless Agg backend) and save_figure().
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..prompt_mix import MATH_TEMPLATE

Prompt = str | list[dict[str, str]]


@dataclass(frozen=True)
class Record:
    id: str
    line: int
    prompt: Prompt
    row: dict[str, Any]


@dataclass
class Rows:
    path: Path
    items: list[Record] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # "FILE:LINE: reason" for every skipped line


def math_prompt(question: str) -> list[dict[str, str]]:
    """The §3 math template (answer in \\boxed{}) as one chat user message."""
    return [{"role": "user", "content": MATH_TEMPLATE.format(question=question)}]


def prompt_of(row: dict[str, Any], *, raw: bool = False) -> Prompt:
    """The prompt of a row ("messages", "prompt" or "question"); ValueError when it has none."""
    if "messages" in row:
        messages = row["messages"]
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)
        if not ok:
            raise ValueError("'messages' must be a non-empty list of {'role', 'content'} objects")
        return messages
    if "prompt" in row:
        text = row["prompt"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError("'prompt' must be non-empty text")
        return text if raw else [{"role": "user", "content": text}]
    if "question" in row:
        question = row["question"]
        if not isinstance(question, str) or not question.strip():
            raise ValueError("'question' must be non-empty text")
        return math_prompt(question)
    raise ValueError("needs 'messages' (chat), 'prompt' (text) or 'question' (GSM8K)")


def read_jsonl(path: str | os.PathLike[str]) -> tuple[list[tuple[int, dict[str, Any]]], list[tuple[int, str]]]:
    """(line number, object) for every well-formed line, and (line number, reason) for the others."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    rows: list[tuple[int, dict[str, Any]]] = []
    errors: list[tuple[int, str]] = []
    with open(p, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                errors.append((number, f"not valid JSON ({exc.msg})"))
                continue
            if not isinstance(row, dict):
                errors.append((number, f"expected a JSON object, got {type(row).__name__}"))
                continue
            rows.append((number, row))
    return rows, errors


def read_records(path: str | os.PathLike[str], *, raw: bool = False,
                 check: Callable[[dict[str, Any]], object] | None = None, limit: int | None = None) -> Rows:
    """Records of a JSONL file, malformed lines reported and skipped; `limit` keeps the first usable ones."""
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive int; got {limit!r}")
    lines, errors = read_jsonl(path)
    out = Rows(Path(path))
    seen: set[str] = set()
    for number, row in lines:
        try:
            prompt = prompt_of(row, raw=raw)
            if check is not None:
                check(row)
        except ValueError as exc:
            errors.append((number, str(exc)))
            continue
        rid = str(row.get("id", number))
        if rid in seen:
            errors.append((number, f"duplicate id {rid!r}"))
            continue
        seen.add(rid)
        out.items.append(Record(rid, number, prompt, row))
        if limit is not None and len(out.items) == limit:
            errors = [e for e in errors if e[0] < number]  # lines past the limit are not evaluated
            break
    out.errors = [f"{out.path}:{number}: {reason}" for number, reason in sorted(errors)]
    if not out.items:
        first = "; ".join(out.errors[:3])
        raise ValueError(f"{out.path} holds no usable records" + (f" ({first})" if first else ""))
    return out


def append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows, one JSON object a line, flushed together (a crash can tear only the last line)."""
    if rows:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_samples(path: Path) -> list[dict[str, Any]]:
    """Rows of a per-sample log written by append_jsonl; a torn last line is dropped from the file."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # an interrupted write: keep the complete lines only
        with open(path, "rb+") as fh:
            fh.truncate(end)
    out = []
    for number, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{number}: not valid JSON; the sample log is damaged, use a new --out") from None
        out.append(row)
    return out


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Save a figure as PNG (creating the directory) and close it.

    Token labels may hold characters the default font lacks (CJK, emoji); matplotlib then draws a box and
    warns per glyph, which says nothing about the evaluation, so those warnings are silenced here.
    """
    import warnings

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font", category=UserWarning)
        fig.tight_layout()
        fig.savefig(out, dpi=120)
    pyplot().close(fig)
    return out

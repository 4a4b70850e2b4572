"""Rollouts: sampled completions of the policy, the raw material of value pretraining (LENVM.md §3).

    prompts = read_prompts("prompts.jsonl")   # {"id", "messages" | "prompt" (a user message), "domain"?, "split"?}
    sample_rollouts(runtime, prompts, "runs/r1", RolloutSettings(samples=8, max_tokens=1024, batch=64))

Output directory (append-only, so an interrupted run resumes where it stopped):
  manifest.json    settings, policy, tokenizer fingerprint; a resumed run must match them
  rollouts.jsonl   one completion per line: id, sample, domain, split, prompt_ids, completion_ids,
                   length (completion tokens, EOS counted when it stopped), finish_reason
                   ("stop": ended with EOS; "length": cut at max_tokens, i.e. censored, never an end),
                   hidden (first row in hidden.f16, or null)
  hidden.f16       with capture_hidden: float16 [rows, D], the final-normed hidden states of the states
                   s_0 … s_length of each completion (s_0 ends at the last prompt token), the inputs of a
                   head trained on the frozen trunk; captured while sampling, so never recomputed

Sampling is the policy's own distribution (temperature 1, top-p 1, no top-k). Completion j of prompt p
draws token i with Philox keyed by (completion_seed(seed, p, j), i), so the output is the same for any
batch size, order or resumption. Rows run as a continuous batch: a finished row is refilled at once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import _native
from .eval.data import read_jsonl
from .runtime import Runtime
from .tokenizer import tokenizer_fingerprint

ROLLOUTS_FILE = "rollouts.jsonl"
HIDDEN_FILE = "hidden.f16"
MANIFEST_FILE = "manifest.json"
FORMAT = "lenvm_rt.rollouts/1"


@dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt: Any  # text or chat messages
    domain: str = "unknown"
    split: str = "train"


@dataclass(frozen=True)
class RolloutSettings:
    samples: int = 8
    max_tokens: int = 1024
    batch: int = 32
    seed: int = 0
    capture_hidden: bool = True

    def check(self) -> None:
        for name in ("samples", "max_tokens", "batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int; got {self.seed!r}")


@dataclass
class Rollout:
    id: str
    sample: int
    domain: str
    split: str
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    hidden: int | None = None

    @property
    def length(self) -> int:
        return len(self.completion_ids)

    def to_json(self) -> str:
        record = asdict(self)
        record["length"] = self.length
        return json.dumps(record, separators=(",", ":"))


def completion_seed(seed: int, prompt_id: str, sample: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{prompt_id}\0{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def read_prompts(path: str | os.PathLike[str]) -> list[PromptRecord]:
    """Prompt records from JSONL; ValueError naming the line for anything malformed."""
    p = Path(path)
    rows, errors = read_jsonl(p)
    if errors:  # training data is all or nothing: the first bad line stops the run
        number, reason = errors[0]
        raise ValueError(f"{p}:{number}: {reason}")
    records: list[PromptRecord] = []
    seen: set[str] = set()
    for number, row in rows:
        prompt = row.get("messages", row.get("prompt"))
        if not (isinstance(prompt, str) and prompt) and not (isinstance(prompt, list) and prompt):
            raise ValueError(f"{p}:{number}: needs a non-empty 'prompt' (text) or 'messages' (chat)")
        if isinstance(prompt, str):  # a text prompt is the user's message, as the model was tuned to see it
            prompt = [{"role": "user", "content": prompt}]
        rid = str(row.get("id", number))
        if rid in seen:
            raise ValueError(f"{p}:{number}: duplicate id {rid!r}")
        seen.add(rid)
        records.append(PromptRecord(rid, prompt, str(row.get("domain", "unknown")), str(row.get("split", "train"))))
    if not records:
        raise ValueError(f"{p} holds no prompts")
    return records


def read_rollouts(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], list[Rollout]]:
    """(manifest, completions) of a rollouts directory; a torn last line (an interrupted write) is ignored."""
    d = Path(directory)
    manifest_path, rollouts_path = d / MANIFEST_FILE, d / ROLLOUTS_FILE
    if not manifest_path.is_file() or not rollouts_path.is_file():
        raise FileNotFoundError(f"{d} is not a rollouts directory (no {MANIFEST_FILE} / {ROLLOUTS_FILE})")
    with open(manifest_path, encoding="utf-8") as fh:
        manifest = json.load(fh)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_path}: not a {FORMAT} manifest")
    out: list[Rollout] = []
    with open(rollouts_path, encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    lines.pop()  # after the last newline: empty, or the torn tail of an interrupted write
    fields = {f.name for f in dataclasses.fields(Rollout)}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{rollouts_path}:{number}: not valid JSON") from None
        if not isinstance(row, dict) or not {"id", "sample", "prompt_ids"} <= set(row):
            raise ValueError(f"{rollouts_path}:{number}: not a completion record")
        row.pop("length", None)
        unknown = set(row) - fields
        if unknown:
            raise ValueError(f"{rollouts_path}:{number}: unknown fields {sorted(unknown)}")
        out.append(Rollout(**row))
    return manifest, out


class _Store:
    """The output directory: appends completions (hidden rows first, then the JSONL line)."""

    def __init__(self, directory: Path, manifest: dict[str, Any], hidden_size: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.hidden_size = hidden_size
        manifest_path = directory / MANIFEST_FILE
        self.done: set[tuple[str, int]] = set()
        rows = 0
        if manifest_path.is_file():
            old, done = read_rollouts(directory)
            if old.get("resume_key") != manifest["resume_key"]:
                raise ValueError(f"{directory} holds rollouts made with other settings or another policy; "
                                 "use a new output directory")
            self.done = {(r.id, r.sample) for r in done}
            rows = max((r.hidden + r.length + 1 for r in done if r.hidden is not None), default=0)
            with open(directory / ROLLOUTS_FILE, "rb+") as fh:  # drop a torn last line
                data = fh.read()
                fh.truncate(data.rfind(b"\n") + 1)
        else:
            _write_json(manifest_path, manifest)
            (directory / ROLLOUTS_FILE).touch()
        self.hidden_path = directory / HIDDEN_FILE
        if manifest["settings"]["capture_hidden"]:
            with open(self.hidden_path, "ab") as fh:
                fh.truncate(rows * hidden_size * 2)
        self.hidden_rows = rows

    def write(self, rollout: Rollout, hidden: list[np.ndarray] | None) -> None:
        if hidden is not None:
            block = np.stack(hidden).astype(np.float16)
            with open(self.hidden_path, "ab") as fh:
                fh.write(block.tobytes())
            rollout.hidden = self.hidden_rows
            self.hidden_rows += block.shape[0]
        with open(self.dir / ROLLOUTS_FILE, "a", encoding="utf-8") as fh:
            fh.write(rollout.to_json() + "\n")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def rollout_manifest(runtime: Runtime, prompts_digest: str, settings: RolloutSettings) -> dict[str, Any]:
    cfg = runtime.config
    output = {k: v for k, v in asdict(settings).items() if k != "batch"}  # what decides the completions
    key = {"settings": output, "prompts": prompts_digest, "tokenizer": tokenizer_fingerprint(runtime.tokenizer),
           "hidden_size": cfg.hidden_size, "policy": str(Path(runtime.directory).resolve())}
    return {"format": FORMAT, **key, "settings": asdict(settings), "eos_token_ids": sorted(runtime.eos_token_ids),
            "resume_key": hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()}


@dataclass
class _Job:
    rollout: Rollout
    seed: int
    hidden: list[np.ndarray] | None
    pending: int = -1  # the sampled token the next step consumes


class _Sampler:
    """Draws from softmax(logits) by inverse CDF with a per-row Philox uniform (temperature 1, top-p 1)."""

    def __call__(self, logits: torch.Tensor, seeds: Sequence[int], offsets: Sequence[int]) -> list[int]:
        u = _native.philox_uniform(np.array(seeds, dtype=np.uint64), np.array(offsets, dtype=np.uint32))
        cdf = torch.softmax(logits.float(), dim=-1).cumsum(dim=-1)
        target = torch.from_numpy(u).to(cdf.device).view(-1, 1) * cdf[:, -1:]
        drawn = torch.searchsorted(cdf, target, right=True).view(-1).clamp_(max=cdf.shape[-1] - 1)
        return drawn.tolist()


def sample_rollouts(runtime: Runtime, prompts: Sequence[PromptRecord], out_dir: str | os.PathLike[str],
                    settings: RolloutSettings, *, progress: bool = True) -> dict[str, Any]:
    """Sample settings.samples completions of every prompt into out_dir; returns a summary."""
    settings.check()
    if not prompts:
        raise ValueError("no prompts to sample")
    encoded = []
    for record in prompts:
        ids = runtime.encode(record.prompt)
        if len(ids) + settings.max_tokens > runtime.max_context:
            raise ValueError(f"prompt {record.id!r} ({len(ids)} tokens) + max_tokens ({settings.max_tokens}) "
                             f"exceeds the context of {runtime.max_context} tokens")
        encoded.append(ids)
    digest = hashlib.sha256(json.dumps([[r.id, ids] for r, ids in zip(prompts, encoded)]).encode()).hexdigest()
    store = _Store(Path(out_dir), rollout_manifest(runtime, digest, settings), runtime.config.hidden_size)
    todo = [(r, ids, j) for r, ids in zip(prompts, encoded) for j in range(settings.samples)
            if (r.id, j) not in store.done]
    total = len(prompts) * settings.samples
    bar = _progress(total, total - len(todo), progress)
    tokens = 0
    for finished in _continuous_batch(runtime, todo, settings):
        store.write(finished.rollout, finished.hidden)
        tokens += finished.rollout.length
        bar.update(1)
        bar.set_postfix(tokens=tokens, refresh=False)
    bar.close()
    return summarize(read_rollouts(out_dir)[1])


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="completion", desc="rollouts", disable=not enabled)


def _continuous_batch(runtime: Runtime, todo: list[tuple[PromptRecord, list[int], int]],
                      settings: RolloutSettings) -> Iterator[_Job]:
    model, eos = runtime.model, runtime.eos_token_ids
    B = min(settings.batch, len(todo))
    if B == 0:
        return
    longest = max(len(ids) for _, ids, _ in todo)
    model.allocate(batch=B, capacity=longest + settings.max_tokens + 1)
    sampler = _Sampler()
    queue = iter(todo)
    slots: list[_Job | None] = [None] * B
    positions = [0] * B  # cache position of each slot's pending token
    with torch.inference_mode():
        while True:
            refill = [b for b in range(B) if slots[b] is None]
            started = _start(model, queue, refill, slots, positions, settings, sampler)
            if not started and all(s is None for s in slots):
                return
            ids = torch.tensor([s.pending if s is not None else 0 for s in slots], device=model.device)
            x = model.decode_step(ids, positions)
            hn = model.normed(x)
            captured = hn.to(torch.float16).cpu().numpy()  # one conversion for the batch, rows taken below
            need: list[int] = []
            for b, job in enumerate(slots):
                if job is None:
                    continue
                if job.hidden is not None:
                    job.hidden.append(captured[b].copy())  # a copy: a view would keep the batch alive
                r = job.rollout
                if r.completion_ids[-1] in eos or r.length == settings.max_tokens:
                    r.finish_reason = "stop" if r.completion_ids[-1] in eos else "length"
                    slots[b] = None
                    yield job
                else:
                    need.append(b)
                    positions[b] += 1
            if need:
                logits = model.lm_logits(hn[need])
                drawn = sampler(logits, [slots[b].seed for b in need], [slots[b].rollout.length for b in need])
                for b, token in zip(need, drawn):
                    slots[b].pending = token
                    slots[b].rollout.completion_ids.append(token)


def _start(model: Any, queue: Iterator[tuple[PromptRecord, list[int], int]], free: list[int],
           slots: list[_Job | None], positions: list[int], settings: RolloutSettings, sampler: _Sampler) -> bool:
    """Prefill the next prompts into free slots and draw their first tokens; False when none were left."""
    from .model import right_padded

    jobs: list[tuple[int, _Job]] = []
    for b in free:
        item = next(queue, None)
        if item is None:
            break
        record, ids, j = item
        rollout = Rollout(record.id, j, record.domain, record.split, list(ids))
        jobs.append((b, _Job(rollout, completion_seed(settings.seed, record.id, j),
                             [] if settings.capture_hidden else None)))
    if not jobs:
        return False
    padded, lengths = right_padded([job.rollout.prompt_ids for _, job in jobs])
    x = model.prefill(padded.to(model.device), lengths, slots=[b for b, _ in jobs])
    hn = model.normed(x)
    captured = hn.to(torch.float16).cpu().numpy()
    drawn = sampler(model.lm_logits(hn), [job.seed for _, job in jobs], [0] * len(jobs))
    for row, ((b, job), token) in enumerate(zip(jobs, drawn)):
        if job.hidden is not None:
            job.hidden.append(captured[row].copy())
        job.pending = token
        job.rollout.completion_ids.append(token)
        positions[b] = lengths[row]
        slots[b] = job
    return True


def summarize(rollouts: Sequence[Rollout]) -> dict[str, Any]:
    """Counts per domain and split: completions, tokens, censored share, length percentiles."""
    groups: dict[str, list[Rollout]] = {}
    for r in rollouts:
        groups.setdefault(f"{r.domain}/{r.split}", []).append(r)
    out: dict[str, Any] = {"completions": len(rollouts), "tokens": sum(r.length for r in rollouts), "groups": {}}
    for key, rs in sorted(groups.items()):
        lengths = np.array([r.length for r in rs])
        out["groups"][key] = {
            "completions": len(rs),
            "prompts": len({r.id for r in rs}),
            "censored": float(np.mean([r.finish_reason == "length" for r in rs])),
            "length_p50": float(np.percentile(lengths, 50)),
            "length_p90": float(np.percentile(lengths, 90)),
        }
    return out

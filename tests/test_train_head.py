"""Head-only value pretraining (LENVM.md §3, §5) on a tiny random policy with synthetic rollouts.

The synthetic rollouts follow a known rule of the prompt: prompts made of tokens of pool A always get
completions of 4 tokens (EOS counted), prompts made of tokens of pool B completions of 24 tokens. The
held-out prompts are other random prompts of the same pools. A head trained on the frozen trunk must
learn the rule, and the saved head must give the same prompt-boundary prediction through
`load(policy, value_model=out)` as at training time.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import make_checkpoint

import lenvm_rt
from lenvm_rt.cli import main
from lenvm_rt.rollouts import MANIFEST_FILE, ROLLOUTS_FILE, Rollout, RolloutSettings, rollout_manifest
from lenvm_rt.tokenizer import tokenizer_fingerprint
from lenvm_rt.train_head import CHECKPOINT_FILE, TrainSettings, ValueHead, predict_logits, train_head
from lenvm_rt.training import load_split, validation_metrics
from lenvm_rt.value_model import LENVM_CONFIG_FILE, VALUE_HEAD_FILE

GAMMA = 0.97
POOL_A, POOL_B = (101, 117, 133), (203, 219, 235)
LEN_A, LEN_B = 4, 24
EOS = 2
SETTINGS = TrainSettings(epochs=12, batch=4, lr=3e-3, gamma=GAMMA, seed=0)

# train_head converts a loss that requires grad to a float (a one-time torch UserWarning, an error under
# this project's filterwarnings = error). test_training_emits_no_warnings pins that defect; the other
# tests ignore exactly that warning so that each of them fails only for its own reason.
IGNORE_SCALAR_WARNING = pytest.mark.filterwarnings(
    "ignore:Converting a tensor with requires_grad=True to a scalar:UserWarning")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("train") / "policy", "qwen2", seed=1)


@pytest.fixture(scope="module")
def rt(ckpt):
    return lenvm_rt.load(str(ckpt), device="cpu")


def write_rollouts(rt, directory: Path, rows: list[Rollout], *, capture_hidden: bool = False) -> Path:
    """A rollouts directory written by hand: manifest from rollout_manifest, one JSONL line per completion."""
    directory.mkdir(parents=True, exist_ok=True)
    settings = RolloutSettings(samples=max(r.sample for r in rows) + 1 if rows else 1, max_tokens=64,
                               capture_hidden=capture_hidden)
    digest = hashlib.sha256(json.dumps([[r.id, r.prompt_ids] for r in rows]).encode()).hexdigest()
    (directory / MANIFEST_FILE).write_text(json.dumps(rollout_manifest(rt, digest, settings)))
    (directory / ROLLOUTS_FILE).write_text("".join(r.to_json() + "\n" for r in rows))
    return directory


def synthetic_rows(prompts_per_class: int, samples: int, seed: int, *, pools=(POOL_A, POOL_B)) -> list[Rollout]:
    """Rollouts whose length is a rule of the prompt: pool A → LEN_A tokens, pool B → LEN_B (EOS last).

    A prompt is 3-7 random tokens of its class's pool and then the pool's first token; completions are
    random tokens of a shared range, then EOS."""
    rng = np.random.default_rng(seed)
    rows = []
    for name, pool, length in (("a", pools[0], LEN_A), ("b", pools[1], LEN_B)):
        for i in range(prompts_per_class):
            prompt = rng.choice(pool, size=int(rng.integers(3, 8))).tolist() + [pool[0]]
            for j in range(samples):
                completion = rng.integers(300, 380, size=length - 1).tolist() + [EOS]
                rows.append(Rollout(f"{name}{seed}-{i}", j, name, "train", prompt, completion, "stop"))
    return rows


@pytest.fixture(scope="module")
def data(rt, tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    train = write_rollouts(rt, root / "train", synthetic_rows(16, 2, seed=0))
    val = write_rollouts(rt, root / "val", synthetic_rows(4, 1, seed=1))
    return train, val


@pytest.fixture(scope="module")
def trained(rt, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("head") / "out"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Converting a tensor with requires_grad=True to a scalar", UserWarning)
        manifest = train_head(rt, *data, out, SETTINGS, progress=False)
    return out, manifest


def _read_rows(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / ROLLOUTS_FILE).read_text().splitlines()]


def _head_from_file(path: Path) -> ValueHead:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    head = ValueHead(tensors["v_head.fc.weight"].shape[0])
    head.load_state_dict({k.removeprefix("v_head."): v for k, v in tensors.items()})
    return head


def _boundary_features(rt, prompts: list[list[int]]) -> list[np.ndarray]:
    """fp32 final-normed hidden state at the last prompt token (s_0), one prefill per prompt."""
    out = []
    for ids in prompts:
        rt.model.allocate(batch=1, capacity=len(ids))
        with torch.inference_mode():
            x = rt.model.prefill(torch.tensor([ids]), [len(ids)])
            out.append(rt.model.normed(x).float().numpy())
    return out


def _remaining(z, gamma: float) -> np.ndarray:
    return np.logaddexp(0.0, np.asarray(z, dtype=np.float64)) / -math.log(gamma)


def _val_prompts(val_dir: Path) -> tuple[list[list[int]], list[int]]:
    rows = [r for r in _read_rows(val_dir) if r["sample"] == 0]
    return [r["prompt_ids"] for r in rows], [r["length"] for r in rows]


# ---- learning ----------------------------------------------------------------------------------------
@IGNORE_SCALAR_WARNING
def test_loss_decreases_and_the_manifest_records_the_run(trained, data, rt):
    out, manifest = trained
    history = manifest["history"]
    assert [h["epoch"] for h in history] == list(range(1, SETTINGS.epochs + 1))
    train_losses = [h["train_loss"] for h in history]
    val_losses = [h["val"]["loss"] for h in history]
    assert train_losses[-1] < 0.4 * train_losses[0]
    assert val_losses[-1] < 0.5 * val_losses[0]
    assert manifest["gamma"] == GAMMA and manifest["gamma_rule"] == "given"
    assert manifest["settings"] == asdict(SETTINGS)
    assert manifest["final"] == history[-1]["val"]
    positions = 16 * 2 * (LEN_A + 1) + 16 * 2 * (LEN_B + 1)
    train_stats = manifest["data"]["train"]
    assert (train_stats["completions"], train_stats["prompts"], train_stats["censored"], train_stats["dropped"],
            train_stats["positions"]) == (64, 32, 0, 0, positions)
    val_stats = manifest["data"]["val"]
    assert (val_stats["completions"], val_stats["prompts"], val_stats["positions"]) == (8, 8, 4 * (LEN_A + LEN_B + 2))
    assert Path(train_stats["rollouts"]) == data[0] and Path(val_stats["rollouts"]) == data[1]
    assert json.loads((out / "manifest.json").read_text()) == manifest


@IGNORE_SCALAR_WARNING
def test_trained_head_separates_the_two_classes(trained, data, ckpt):
    out, manifest = trained
    rt = lenvm_rt.load(str(ckpt), value_model=out, device="cpu")  # γ read from the checkpoint
    assert rt.gamma == GAMMA and rt.value.shared_trunk
    prompts, lengths = _val_prompts(data[1])
    assert sorted(set(lengths)) == [LEN_A, LEN_B]
    assert not {tuple(p) for p in prompts} & {tuple(p) for p in _val_prompts(data[0])[0]}  # held out
    predicted = rt.predict_length(prompts)
    for length, pred in zip(lengths, predicted):
        assert abs(pred - length) <= 0.35 * length, (length, predicted)
    assert manifest["final"]["mre"] < 0.5 * manifest["history"][0]["val"]["mre"]  # training made the difference
    # and the reported prompt-boundary MRE is that of these predictions (one completion length per prompt)
    mre = float(np.mean([abs(p - n) / n for p, n in zip(predicted, lengths)]))
    assert manifest["final"]["mre"] == pytest.approx(mre, abs=5e-3)
    assert manifest["final"]["prompts"] == len(prompts)


@IGNORE_SCALAR_WARNING
def test_runtime_reproduces_the_training_time_prediction(trained, data, ckpt, rt):
    out, manifest = trained
    head = _head_from_file(out / VALUE_HEAD_FILE)
    served = lenvm_rt.load(str(ckpt), value_model=out, device="cpu")
    prompts, _ = _val_prompts(data[1])
    predicted = np.array(served.predict_length(prompts))
    # the same fp32 boundary features through the training code's head
    z = [zs[0] for zs in predict_logits(head, _boundary_features(rt, prompts))]
    np.testing.assert_allclose(predicted, _remaining(z, GAMMA), rtol=1e-5)
    # the features train_head used (fp16 cache of its prefill) give the same prediction within fp16 rounding
    from lenvm_rt.train_head import split_features

    split = load_split(data[1], manifest["tokenizer"], GAMMA, "censor")
    feats = split_features(rt, split, out / "features-val.f16", progress=False)
    z_train = predict_logits(head, feats)
    first = {e.rollout.id: float(_remaining([zt[0]], GAMMA)[0]) for e, zt in zip(split.examples, z_train)}
    ids = [r["id"] for r in _read_rows(data[1]) if r["sample"] == 0]
    np.testing.assert_allclose(predicted, [first[i] for i in ids], rtol=2e-3)
    # the saved head is the one the final validation metrics were computed with
    metrics = validation_metrics(split, z_train, GAMMA)
    assert metrics["loss"] == pytest.approx(manifest["final"]["loss"], rel=1e-9)
    assert metrics["mre"] == pytest.approx(manifest["final"]["mre"], rel=1e-9)


@IGNORE_SCALAR_WARNING
def test_saved_head_is_in_the_lenvm_format(trained):
    from safetensors import safe_open

    out, _ = trained
    with safe_open(str(out / VALUE_HEAD_FILE), "pt") as f:
        assert float(f.metadata()["gamma"]) == GAMMA
        shapes = {k: tuple(f.get_tensor(k).shape) for k in f.keys()}
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())
    D = 64
    assert shapes == {"v_head.fc.weight": (D, D), "v_head.fc.bias": (D,), "v_head.summary.weight": (1, D),
                      "v_head.summary.bias": (1,)}
    assert json.loads((out / LENVM_CONFIG_FILE).read_text())["gamma"] == GAMMA


# ---- resumption ----------------------------------------------------------------------------------
@IGNORE_SCALAR_WARNING
def test_resume_after_a_finished_run_does_not_retrain(trained, data, rt, tmp_path, monkeypatch):
    out, manifest = trained
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    head_before = (copy / VALUE_HEAD_FILE).read_bytes()
    checkpoint_before = (copy / CHECKPOINT_FILE).read_bytes()

    def no_update(*_a, **_k):
        raise AssertionError("resume=True after a finished run trained again")

    monkeypatch.setattr("lenvm_rt.train_head.half_mse", no_update)
    again = train_head(rt, *data, copy, SETTINGS, resume=True, progress=False)
    assert again["history"] == manifest["history"]
    assert (copy / VALUE_HEAD_FILE).read_bytes() == head_before
    assert (copy / CHECKPOINT_FILE).read_bytes() == checkpoint_before


@IGNORE_SCALAR_WARNING
@pytest.mark.parametrize("change", [dict(lr=1e-3), dict(epochs=SETTINGS.epochs + 1), dict(gamma=0.95),
                                    dict(censoring="as-ended"), dict(seed=1)])
def test_resume_with_other_settings_raises(trained, data, rt, tmp_path, change):
    out, _ = trained
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    head_before = (copy / VALUE_HEAD_FILE).read_bytes()
    with pytest.raises(ValueError, match="another run"):
        train_head(rt, *data, copy, TrainSettings(**{**asdict(SETTINGS), **change}), resume=True, progress=False)
    assert (copy / VALUE_HEAD_FILE).read_bytes() == head_before


@IGNORE_SCALAR_WARNING
def test_resume_with_other_rollouts_raises(trained, data, rt, tmp_path):
    out, _ = trained
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    other = write_rollouts(rt, tmp_path / "other", synthetic_rows(16, 2, seed=5))
    with pytest.raises(ValueError, match="another run"):
        train_head(rt, other, data[1], copy, SETTINGS, resume=True, progress=False)


@IGNORE_SCALAR_WARNING
def test_interrupted_training_resumes_to_the_same_head(trained, data, rt, tmp_path, monkeypatch):
    """Stop after epoch 2 (the checkpoint is written after each epoch), resume: same head as without a stop."""
    settings = TrainSettings(**{**asdict(SETTINGS), "epochs": 4})
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    for d in (whole, parts):  # the hidden-state features of these rollouts, computed by the fixture's run
        d.mkdir()
        for name in ("features-train.f16", "features-val.f16"):
            shutil.copy(trained[0] / name, d / name)
    expected = train_head(rt, *data, whole, settings, progress=False)

    calls = {"n": 0}
    real = validation_metrics

    def stop_in_epoch_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr("lenvm_rt.train_head.validation_metrics", stop_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train_head(rt, *data, parts, settings, progress=False)
    assert not (parts / VALUE_HEAD_FILE).exists()
    assert torch.load(parts / CHECKPOINT_FILE, weights_only=False)["epoch"] == 2
    monkeypatch.setattr("lenvm_rt.train_head.validation_metrics", real)
    resumed = train_head(rt, *data, parts, settings, resume=True, progress=False)
    assert resumed["history"] == expected["history"]
    a, b = _head_from_file(whole / VALUE_HEAD_FILE), _head_from_file(parts / VALUE_HEAD_FILE)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


@IGNORE_SCALAR_WARNING
def test_retraining_in_a_used_directory_uses_the_new_rollouts(trained, data, rt, tmp_path):
    """Features cached in --out by an earlier run on other rollouts must not be reused for new ones."""
    settings = TrainSettings(**{**asdict(SETTINGS), "epochs": 1})
    # the same lengths, other tokens: the cached feature files have exactly the size the new data needs
    other = write_rollouts(rt, tmp_path / "other", synthetic_rows(16, 2, seed=0, pools=((41, 57, 73), (83, 89, 97))))
    used = tmp_path / "used"
    shutil.copytree(trained[0], used)
    fresh = tmp_path / "fresh"
    a = train_head(rt, other, data[1], used, settings, progress=False)
    b = train_head(rt, other, data[1], fresh, settings, progress=False)
    assert a["history"] == b["history"], "the run in the used directory trained on stale hidden-state features"


def test_training_emits_no_warnings(rt, data, tmp_path):
    """The project runs its tests with warnings as errors: training must not warn (torch warns once per
    process, so set_warn_always makes the check independent of which test trained first)."""
    rows = synthetic_rows(2, 1, seed=3)
    train = write_rollouts(rt, tmp_path / "train", rows)
    previous = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            train_head(rt, train, train, tmp_path / "out", TrainSettings(epochs=1, batch=2, gamma=GAMMA),
                       progress=False)
    finally:
        torch.set_warn_always(previous)


@IGNORE_SCALAR_WARNING
def test_captured_hidden_states_are_the_features_a_prefill_computes(rt, tmp_path):
    """Rollouts sampled with capture_hidden: training reads hidden.f16 instead of recomputing, and those rows
    are the features the prefill path would compute."""
    from lenvm_rt.rollouts import PromptRecord, sample_rollouts
    from lenvm_rt.train_head import _computed_features, split_features

    d = tmp_path / "r"
    sample_rollouts(rt, [PromptRecord("x", [101, 117, 133, 101]), PromptRecord("y", [203, 219, 203])], d,
                    RolloutSettings(samples=2, max_tokens=12, batch=3), progress=False)
    split = load_split(d, tokenizer_fingerprint(rt.tokenizer), GAMMA, "as-ended")
    captured = split_features(rt, split, tmp_path / "cache.f16", progress=False)
    assert not (tmp_path / "cache.f16").exists()  # read from the rollouts, not recomputed
    computed = _computed_features(rt, split, tmp_path / "computed.f16", progress=False)
    assert [a.shape for a in captured] == [b.shape for b in computed] == [
        (e.rollout.length + 1, rt.config.hidden_size) for e in split.examples]
    for a, b in zip(captured, computed):  # two fp16 roundings of the same fp32 states: at most one ulp apart
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=1e-3, atol=1e-5)
    settings = TrainSettings(epochs=1, batch=2, gamma=GAMMA, censoring="as-ended")
    manifest = train_head(rt, d, d, tmp_path / "out", settings, progress=False)
    assert manifest["data"]["train"]["completions"] == 4
    assert not (tmp_path / "out" / "features-train.f16").exists()


# ---- censoring and the γ rule ------------------------------------------------------------------------
@IGNORE_SCALAR_WARNING
def test_censored_completions_are_counted_and_masked(rt, tmp_path):
    gamma = 0.9
    H = math.ceil(math.log(0.01) / math.log(gamma))  # 44: γ^H ≤ 0.01
    prompt = [101, 117, 133]
    rows = [Rollout("p", 0, "x", "train", prompt, [300] * 5 + [EOS], "stop"),
            Rollout("p", 1, "x", "train", prompt, [301] * 59 + [302], "length"),  # cut at 60: 60 − H + 1 states
            Rollout("q", 0, "x", "train", prompt + [5], [303] * 10, "length")]  # cut before the horizon: dropped
    train = write_rollouts(rt, tmp_path / "train", rows)
    manifest = train_head(rt, train, train, tmp_path / "out", TrainSettings(epochs=1, batch=2, gamma=gamma),
                          progress=False)
    stats = manifest["data"]["train"]
    assert (stats["completions"], stats["prompts"], stats["censored"], stats["dropped"]) == (3, 2, 2, 1)
    assert stats["positions"] == 7 + (60 - H + 1)


@pytest.fixture(scope="module")
def cli_run(ckpt, data, tmp_path_factory):
    """`lenvm-rt train --json` without --gamma: (output directory, stdout)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("cli") / "out"
    stdout = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(stdout):
        warnings.filterwarnings("ignore", "Converting a tensor with requires_grad=True to a scalar", UserWarning)
        code = main(["train", "--model", str(ckpt), "--device", "cpu", "--rollouts", str(data[0]), "--val",
                     str(data[1]), "--out", str(out), "--epochs", "2", "--batch", "16", "--no-progress", "--json"])
    assert code == 0
    return out, stdout.getvalue()


def test_cli_train_with_the_p99_gamma_rule(cli_run, ckpt, data):
    out, stdout = cli_run
    printed = json.loads(stdout.strip().splitlines()[-1])
    lengths = [r["length"] for r in _read_rows(data[0])]
    gamma = 0.01 ** (1.0 / float(np.quantile(lengths, 0.99)))  # the p99 rule, computed independently
    assert printed["gamma"] == pytest.approx(gamma, rel=1e-12)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["gamma_rule"].startswith("p99") and printed["final"] == manifest["final"]
    assert len(manifest["history"]) == 2
    assert lenvm_rt.load(str(ckpt), value_model=out, device="cpu").gamma == pytest.approx(gamma, rel=1e-12)


def test_cli_train_json_is_one_line(cli_run):
    """--json: 'print the summary as one line of JSON'; a script reading stdout gets nothing else."""
    _, stdout = cli_run
    assert len(stdout.strip().splitlines()) == 1, stdout


# ---- bad input -------------------------------------------------------------------------------------
def _other_vocabulary_checkpoint(ckpt: Path, directory: Path) -> Path:
    """The policy with two tokens' ids swapped in its vocabulary: the same text gives other ids."""
    shutil.copytree(ckpt, directory)
    path = directory / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    a, b = [t for t, i in vocab.items() if i in (50, 60)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(spec), encoding="utf-8")
    return directory


@pytest.fixture
def bad_data(request, rt, ckpt, data, tmp_path):
    """A training rollouts directory with one defect; returns (directory, settings, message)."""
    kind = request.param
    settings = TrainSettings(epochs=1, batch=4, gamma=GAMMA)
    rows = synthetic_rows(2, 1, seed=7)
    if kind == "empty":
        d = write_rollouts(rt, tmp_path / "bad", rows)
        (d / ROLLOUTS_FILE).write_text("")
        return d, settings, "no completions"
    if kind == "tokenizer":
        other = lenvm_rt.load(str(_other_vocabulary_checkpoint(ckpt, tmp_path / "other")), device="cpu")
        return write_rollouts(other, tmp_path / "bad", rows), settings, "different tokenizer"
    if kind == "no-completion":
        rows[1] = Rollout(rows[1].id, rows[1].sample, "x", "train", rows[1].prompt_ids, [], None)
        return write_rollouts(rt, tmp_path / "bad", rows), settings, "no finished completion"
    if kind == "all-cut":
        rows = [Rollout(r.id, r.sample, "x", "train", r.prompt_ids, r.completion_ids[:-1] + [300], "length")
                for r in rows]  # cut after ≤ 24 tokens; the horizon at γ = 0.97 is 152 tokens
        return write_rollouts(rt, tmp_path / "bad", rows), settings, "no completion has a trainable state"
    if kind == "gamma":
        return data[0], TrainSettings(epochs=1, gamma=1.0), "gamma"
    if kind == "missing":
        return tmp_path / "none", settings, "not a rollouts directory"
    raise AssertionError(kind)


BAD = ["empty", "tokenizer", "no-completion", "all-cut", "gamma", "missing"]


@IGNORE_SCALAR_WARNING
@pytest.mark.parametrize("bad_data", BAD, indirect=True)
def test_bad_training_data_raises(bad_data, rt, data, tmp_path):
    directory, settings, message = bad_data
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train_head(rt, directory, data[1], tmp_path / "out", settings, progress=False)
    with pytest.raises((ValueError, FileNotFoundError), match=message):  # as held-out data too
        train_head(rt, data[0], directory, tmp_path / "out", settings, progress=False)
    assert not (tmp_path / "out" / VALUE_HEAD_FILE).exists()


@IGNORE_SCALAR_WARNING
@pytest.mark.parametrize("bad_data", BAD, indirect=True)
def test_cli_train_bad_input_exits_2(bad_data, ckpt, data, tmp_path, capsys):
    directory, settings, message = bad_data
    argv = ["train", "--model", str(ckpt), "--device", "cpu", "--rollouts", str(directory), "--val", str(data[1]),
            "--out", str(tmp_path / "out"), "--epochs", "1", "--gamma", str(settings.gamma), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


@pytest.mark.parametrize("bad", [dict(gamma=0.0), dict(gamma=1.5), dict(epochs=0), dict(batch=0), dict(lr=0.0),
                                 dict(lr=float("nan")), dict(warmup=1.0), dict(censoring="drop")])
def test_bad_train_settings(bad):
    with pytest.raises(ValueError):
        TrainSettings(**bad).check()

"""The results document: sources written by the eval modules' own summary and record functions, rendered into
Markdown tables with the paper's numbers beside ours; missing sources say "not run"; bad JSON names its file."""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest

from lenvm_rt.bench.report import write_record
from lenvm_rt.cli_eval_report import add_report_command
from lenvm_rt.eval.data import Record
from lenvm_rt.eval.length_tokens import TokenStat, top_tokens
from lenvm_rt.eval.lifebench_score import length_deviation, length_score, summarize
from lenvm_rt.eval.mre import ground_truth_length, mean_relative_error, position_errors, relative_error
from lenvm_rt.eval.report import write_results
from lenvm_rt.eval.tradeoff import TradeoffSettings, _digest, _key
from lenvm_rt.eval.tradeoff import summarize as tradeoff_summary

GAMMA = 0.997
# (constraint, target) -> lengths of units u1, u2, per mode
LIFEBENCH = {"unguided": {("equal", 32): (48, 32), ("equal", 64): (64, 64), ("at_most", 32): (1, 20),
                          ("at_most", 64): (64, 70)},
             "guided": {("equal", 32): (32, 32), ("equal", 64): (64, 64), ("at_most", 32): (40, 30),
                        ("at_most", 64): (60, 64)}}
# mode -> unit -> (nll, repetition_rate) of every output: per cell unguided 2.5 / 5%, guided 3.75 / 25%
QUALITY = {"unguided": {"u1": (2.0, 0.0), "u2": (3.0, 0.1)}, "guided": {"u1": (3.0, 0.2), "u2": (4.5, 0.3)}}
# (method, beta) -> (nll, repetition_rate) of every trade-off sample
TRADEOFF_QUALITY = {("tilt", 0.0): (2.0, 0.0), ("tilt", -1000.0): (3.0, 0.5), ("at_most", 199): (1.75, 0.1),
                    ("unguided", None): (1.5, 0.25)}


def _lifebench_record(uid: str, constraint: str, target: int, length: int, guided: bool, quality: bool) -> dict:
    deviation = length_deviation(length, target)
    filtered = length < 2
    nll, rep = QUALITY["guided" if guided else "unguided"][uid]
    fields = {"nll": nll, "mean_rank": 2.0, "mean_prob": 0.5, "repetition_rate": rep} if quality else {}
    return {**fields, "id": uid, "category": "qa", "type": "", "lang": "en", "constraint": constraint, "target": target,
            "guided": guided, "run": "abc", "prompt_tokens": 40, "max_new_tokens": 2 * target + 32,
            "context_capped": False, "skipped": None, "text": "x", "length": length, "num_tokens": length + 1,
            "finish_reason": "stop", "deviation": deviation, "filtered": filtered,
            "score": None if filtered else length_score(deviation, constraint)}


def write_lifebench(folder: Path, modes: tuple[str, ...] = ("unguided", "guided"), quality: bool = True) -> None:
    """Summaries as run_lifebench writes them; quality=False: as written before the quality measures existed."""
    for mode in modes:
        guided = mode == "guided"
        records = [_lifebench_record(uid, c, t, n, guided, quality) for (c, t), lengths in LIFEBENCH[mode].items()
                   for uid, n in zip(("u1", "u2"), lengths)]
        results = summarize(records, ["equal", "at_most"], [32, 64])
        if not quality:
            del results["quality"]
        results.update(skipped_units=[], malformed_lines=[], ignored_result_lines=0, evaluated_now=8)
        config = {"model": "/models/smollm2", "value_model": "/heads/h1/value_head.safetensors" if guided else None,
                  "gamma": GAMMA if guided else None, "guided": guided, "sampling": {"temperature": 0.0},
                  "units": 2, "targets": [32, 64], "constraints": ["equal", "at_most"], "device": "cpu",
                  "dtype": "float32", "data": "data_lite.jsonl"}
        write_record(folder / f"lifebench_{mode}.json", "lifebench", config, results)
    (folder / "lifebench_scores.png").write_bytes(b"\x89PNG")


def write_tradeoff(folder: Path, prefix: str) -> None:
    settings = TradeoffSettings(betas=(0.0, -1000.0), budgets=(200, 256), at_most=(199,), samples=2)
    questions = [Record(f"{prefix}{i}", i + 1, f"question {i}", {"question": "q", "answer": f"#### {gold}"})
                 for i, gold in enumerate((5, 7))]
    samples = {("tilt", 0.0): [[("\\boxed{5}", 300), ("\\boxed{5}", 340)], [("\\boxed{7}", 320), ("\\boxed{1}", 360)]],
               ("tilt", -1000.0): [[("\\boxed{5}", 150)] * 2, [("\\boxed{7}", 150), ("\\boxed{2}", 150)]],
               ("at_most", 199): [[("\\boxed{5}", 120)] * 2, [("\\boxed{7}", 200), ("x", 90)]],
               ("unguided", None): [[("\\boxed{5}", 300), ("\\boxed{5}", 100)], [("\\boxed{7}", 250), ("9", 180)]]}
    done = {_key(m, b, q.id, _digest(q), j): {"text": text, "finish_reason": "stop", "num_tokens": n,
                                              "nll": TRADEOFF_QUALITY[(m, b)][0], "mean_rank": 3.0, "mean_prob": 0.4,
                                              "repetition_rate": TRADEOFF_QUALITY[(m, b)][1]}
            for (m, b), per_q in samples.items() for q, rows in zip(questions, per_q)
            for j, (text, n) in enumerate(rows)}
    results = tradeoff_summary(done, questions, settings)
    results["skipped_lines"] = []
    config = {**asdict(settings), "policy": "/models/qwen", "value_model": "/heads/h1/value_head.safetensors",
              "gamma": GAMMA, "questions": 2, "prompt": "math template", "answer_extraction": "last boxed",
              "length_counter": "generated tokens, EOS counted"}
    write_record(folder / "tradeoff.json", "eval-tradeoff", config, results)


def write_mre(folder: Path) -> None:
    cases = [("p1", "math", 110.0), ("p2", "math", 90.0), ("p3", "code", 150.0)]
    per_prompt = [{"id": pid, "domain": d, "predicted": pred, "ground_truth": ground_truth_length([100, 100], GAMMA),
                   "mean_length": 100.0, "lengths": [100, 100], "cut": 0} for pid, d, pred in cases]
    for p in per_prompt:
        p["rel_error"] = relative_error(p["predicted"], p["ground_truth"])
    results = {"mre": mean_relative_error([p["predicted"] for p in per_prompt],
                                          [p["ground_truth"] for p in per_prompt]),
               "mre_median": 0.1, "mre_by_domain": {"code": 0.5, "math": 0.1}, "prompts": 3, "completions": 6,
               "cut_completions": 0, "cut_share": 0.0, "prompts_with_cut": 0,
               "position_rel_error": position_errors([([5.0, 3.0, 2.0, 1.0, 0.0], 4)]), "position_completions": 1,
               "per_prompt": per_prompt, "skipped_lines": []}
    config = {"samples": 2, "max_tokens": 512, "batch": 16, "seed": 0, "positions": True, "policy": "/models/qwen",
              "gamma": GAMMA, "value_model": "/heads/h1/value_head.safetensors",
              "sampling": "temperature 1, top-p 1, no top-k", "ground_truth": "ln(1 - mean(1 - gamma^L)) / ln gamma"}
    write_record(folder / "mre.json", "eval-mre", config, results)
    (folder / "mre.png").write_bytes(b"\x89PNG")


def write_head(folder: Path) -> None:
    def val(loss: float, mre: float, last: float) -> dict:
        return {"loss": loss, "mre": mre, "mre_median": mre, "mre_by_domain": {"math": mre}, "prompts": 4,
                "position_rel_error": {"0%": mre, "25%": 0.2, "50%": 0.3, "75%": last}}

    split = {"rollouts": "runs/train", "completions": 8, "prompts": 4, "censored": 1, "dropped": 0, "positions": 900}
    manifest = {"format": "lenvm_rt.value_head/1", "mode": "head", "policy": "/models/qwen", "tokenizer": "t",
                "gamma": GAMMA, "gamma_rule": "given", "settings": {"epochs": 2, "batch": 8, "lr": 0.001,
                                                                     "censoring": "censor", "seed": 0},
                "data": {"train": split, "val": {**split, "rollouts": "runs/val"}},
                "history": [{"epoch": 1, "train_loss": 0.0123456, "val": val(0.011, 0.4, 0.5)},
                            {"epoch": 2, "train_loss": 0.0081, "val": val(0.0075, 0.25, math.nan)}]}
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps(manifest))  # NaN as json.dumps writes it


def write_length_tokens(folder: Path) -> None:
    stats = {"but": TokenStat(4, 3, 0, 0.06), "\n\n": TokenStat(5, 0, 4, -0.1), "a|b": TokenStat(2, 1, 0, 0.02)}
    results = {"threshold": 0.01, "completions": 3, "given_responses": 1, "sampled_completions": 2, "tokens": 11,
               "positive_tokens": 4, "negative_tokens": 4, "positive": top_tokens(stats, 20, +1),
               "negative": top_tokens(stats, 20, -1), "per_token": [], "skipped_lines": []}
    write_record(folder / "length_tokens.json", "eval-length-tokens", {"gamma": GAMMA}, results)


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    src = {"lifebench": tmp_path / "eval/lifebench", "tradeoff:gsm8k": tmp_path / "eval/gsm8k",
           "tradeoff:small": tmp_path / "eval/small", "mre": tmp_path / "eval/mre",
           "length_tokens": tmp_path / "eval/lt", "head": tmp_path / "heads/h1"}
    for key, folder in src.items():
        if key != "head":
            folder.mkdir(parents=True)
    write_lifebench(src["lifebench"])
    write_tradeoff(src["tradeoff:gsm8k"], "gsm-")
    write_tradeoff(src["tradeoff:small"], "arith-")
    write_mre(src["mre"])
    write_head(src["head"])
    write_length_tokens(src["length_tokens"])
    return src


def test_lifebench_cells_averages_and_paper_numbers(sources, tmp_path):
    out = tmp_path / "docs/RESULTS.md"
    md = write_results(sources, out)
    assert out.read_text(encoding="utf-8") == md
    # unguided equal@32: lengths 48, 32 -> 100·e^{-1} = 36.8 and 100 -> 68.4; |LD| 50% and 0% -> 25.0%
    assert "| equal | 32 | 68.4 | 100.0 | 25.0% | 0.0% | 2 / 2 |" in md
    # at_most@32: unguided length 1 is filtered, 20 scores 100; guided 40 -> 100·e^{-0.5} = 60.7 and 30 -> 100
    assert "| at_most | 32 | 100.0 | 80.3 | 37.5% | 15.6% | 1 / 2 |" in md
    assert ("| Equal To LS ↑ | 84.2 | 100.0 | +15.8 | 25.6 → 62.6 | 30.9 → 64.8 | 36.8 → 67.2 | "
            "53.2 (Claude-Opus-4-6-thinking) |") in md
    assert ("| Equal To \\|LD\\| ↓ | 12.5% | 0.0% | -12.5 pp | 83% → 56% | 71% → 44% | 90% → 57% | "
            "66% (Claude-Opus-4-6) |") in md
    assert "| At Least LS ↑ | — | — | — | 94.6 → 93.1 | 89.1 → 99.5 | 99.3 → 99.8 |" in md
    assert "![LIFEBench length score per target](../eval/lifebench/lifebench_scores.png)" in md


def test_lifebench_quality_beside_the_length_scores(sources, tmp_path):
    md = write_results(sources, tmp_path / "RESULTS.md")
    # per cell: NLL unguided (2 + 3)/2, guided (3 + 4.5)/2, their difference; rep4 (0 + 0.1)/2, (0.2 + 0.3)/2
    assert "| equal | 32 | 68.4 | 100.0 | 25.0% | 0.0% | 2 / 2 | 2.500 | 3.750 | +1.250 | 5.0% | 25.0% |" in md
    # the filtered unguided output of at_most@32 is scored for quality too: it ran
    assert "| at_most | 32 | 100.0 | 80.3 | 37.5% | 15.6% | 1 / 2 | 2.500 | 3.750 | +1.250 | 5.0% | 25.0% |" in md
    assert "| NLL (policy, all cells) ↓ | 2.500 | 3.750 | +1.250 | — | — | — | — |" in md
    assert "| rep4 (all cells) ↓ | 5.0% | 25.0% | +20.0 pp | — | — | — | — |" in md
    assert "ΔNLL = guided − unguided" in md


def test_summaries_without_quality_still_render(tmp_path):
    write_lifebench(tmp_path, quality=False)
    md = write_results({"lifebench": tmp_path}, tmp_path / "RESULTS.md")
    assert "| equal | 32 | 68.4 | 100.0 | 25.0% | 0.0% | 2 / 2 | — | — | — | — | — |" in md
    assert "| NLL (policy, all cells) ↓ | — | — | — |" in md


def test_setup_lists_every_record_with_model_gamma_and_machine(sources, tmp_path):
    md = write_results(sources, tmp_path / "RESULTS.md", title="Ours")
    assert md.startswith("# Ours\n")
    setup = md.split("## Setup", 1)[1].split("## LIFEBench", 1)[0]
    guided = next(line for line in setup.splitlines() if line.startswith("| lifebench guided |"))
    record = json.loads((sources["lifebench"] / "lifebench_guided.json").read_text())
    assert record["timestamp"] in guided and "`/models/smollm2`" in guided and "| 0.997 |" in guided
    assert f"{record['machine']['cores']} cores" in guided and "run on cpu, float32" in guided
    assert "| head | " in setup and "`/models/qwen`" in setup
    assert "No record holds its command line" in setup


def test_tradeoff_tables_label_the_data_set(sources, tmp_path):
    md = write_results(sources, tmp_path / "RESULTS.md")
    gsm8k = md.split("### gsm8k", 1)[1].split("### small", 1)[0]
    assert "Data set: **GSM8K** (label `gsm8k`; the record holds no data path)" in gsm8k
    # NLL, ΔNLL vs unguided, rep4 beside pass@1 and tokens; budget rows: the unguided responses' quality
    assert "| tilt | β = 0 | 0.750 | 330.0 | 2.000 | +0.500 | 0.0% | 4 | 0 cut | (340, 0.815) |" in gsm8k
    assert "| tilt | β = -1000 | 0.750 | 150.0 | 3.000 | +1.500 | 50.0% | 4 | 0 cut | (200, 0.630) |" in gsm8k
    assert "| hard budget | B = 200 | 0.250 | 170.0 | 1.500 | +0.000 | 25.0% | 4 | 2 over B | (200, 0.050) |" in gsm8k
    assert "| hard budget | B = 256 | 0.500 | 196.5 | 1.500 | +0.000 | 25.0% | 4 | 1 over B | — |" in gsm8k
    assert "| unguided | B = ∞ | 0.750 | 207.5 | 1.500 | +0.000 | 25.0% | 4 | 0 cut | (340, 0.815) |" in gsm8k
    assert "| method | setting | pass@1 | mean tokens | NLL | ΔNLL vs unguided | rep4 | samples |" in gsm8k
    # At Most N beside the unguided responses cut at N + 1 generated tokens (N text tokens, then EOS)
    assert "| LenVM at most | N = 199 | 0.750 | 132.5 | 1.750 | +0.250 | 10.0% | 4 | 0 over N | — |" in gsm8k
    assert "| unguided, cut at N | B = 200 | 0.250 | 170.0 | 1.500 | +0.000 | 25.0% | 4 | 2 over B | — |" in gsm8k
    assert "policy's own mean negative log-likelihood" in gsm8k
    small = md.split("### small", 1)[1].split("## ", 1)[0]
    assert "Data set: **generated arithmetic** (question ids `arith-*`" in small
    assert "| tilt | β = -1000 | 0.750 | 150.0 | 3.000 | +1.500 | 50.0% | 4 | 0 cut |\n" in small
    assert "paper Fig. 2a" not in small and "no numbers on this data set" in small


def test_mre_head_and_length_token_tables(sources, tmp_path):
    md = write_results(sources, tmp_path / "RESULTS.md")
    assert "| all | 23.3% | 10.0% | — | — | — | — | — |" in md
    assert "| math | 10.0% | — | 17.0% | 13.6% | 11.0% | 10.4% | 9.8% |" in md
    assert "| code | 50.0% | — | 29.0% | 24.0% | 19.5% | 17.0% | 14.9% |" in md
    assert "| 0% | 25.0% |" in md and "| 75% | 0.0% |" in md
    assert "![Predicted vs ground-truth length](eval/mre/mre.png)" in md
    assert "| 1 | 0.01235 | 0.01100 | 40.0% | 40.0% | 40.0% | 40.0% | 20.0% | 30.0% | 50.0% |" in md
    assert "| 2 | 0.00810 | 0.00750 | 25.0% | 25.0% | 25.0% | 25.0% | 20.0% | 30.0% | — |" in md
    assert "censored" in md and "γ = 0.997 (given)" in md
    assert "| `but` | 3 | 4 | 75.0% | +0.0150 |" in md
    assert "| `a\\|b` | 1 | 2 | 50.0% | +0.0100 |" in md
    assert "| `\\n\\n` | 4 | 5 | 80.0% | -0.0200 |" in md
    assert "length_tokens.png" not in md  # no PNG beside that JSON, so no link


def test_missing_sources_say_not_run(tmp_path):
    md = write_results({}, tmp_path / "RESULTS.md")
    for heading in ("## LIFEBench", "## Performance", "## Length prediction", "## Value head", "## Length tokens"):
        assert md.split(heading, 1)[1].split("\n\n", 2)[1].startswith("not run")
    (tmp_path / "empty").mkdir()
    write_lifebench(tmp_path / "empty", modes=("guided",))
    md = write_results({"mre": tmp_path / "empty", "lifebench": tmp_path / "empty",
                        "tradeoff:gsm8k": tmp_path / "nowhere"}, tmp_path / "RESULTS.md")
    assert f"not run (no mre.json in `{tmp_path / 'empty'}`)" in md
    assert f"### gsm8k\n\nnot run (no tradeoff.json in `{tmp_path / 'nowhere'}`)" in md
    assert "| equal | 32 | — | 100.0 | — | 0.0% | — / 2 |" in md  # guided only
    assert "| Equal To LS ↑ | — | 100.0 | — |" in md


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"config": {}, "results": {}}'])
def test_malformed_json_raises_value_error_naming_the_file(tmp_path, text):
    (tmp_path / "mre.json").write_text(text)
    with pytest.raises(ValueError, match=r"mre\.json"):
        write_results({"mre": tmp_path}, tmp_path / "RESULTS.md")
    assert not (tmp_path / "RESULTS.md").exists()


def test_malformed_lifebench_and_unknown_source(tmp_path):
    (tmp_path / "lifebench_guided.json").write_text('{"config": {"guided": true}, "results": {"scores": 3}}')
    with pytest.raises(ValueError, match=r"lifebench_guided\.json"):
        write_results({"lifebench": tmp_path}, tmp_path / "RESULTS.md")
    with pytest.raises(ValueError, match="unknown report source 'bogus'"):
        write_results({"bogus": tmp_path}, tmp_path / "RESULTS.md")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    add_report_command(sub)
    return p


def test_cli_end_to_end(sources, tmp_path):
    out = tmp_path / "docs/RESULTS.md"
    args = _parser().parse_args(["report", "--out", str(out), "--lifebench", str(sources["lifebench"]),
                                 "--tradeoff", f"gsm8k={sources['tradeoff:gsm8k']}",
                                 "--tradeoff", f"arithmetic={sources['tradeoff:small']}",
                                 "--mre", str(sources["mre"]), "--head", str(sources["head"])])
    assert args.func(args) == 0
    md = out.read_text(encoding="utf-8")
    assert "### gsm8k" in md and "### arithmetic" in md and "| equal | 32 | 68.4 | 100.0 |" in md
    assert f"This document: `lenvm-rt eval report --out {out} --lifebench {sources['lifebench']}" in md
    assert md.split("## Length tokens", 1)[1].strip().startswith("not run (no --length-tokens source)")


@pytest.mark.parametrize("argv, message", [
    (["--tradeoff", "a=x", "--tradeoff", "a=y"], "label 'a' is given twice"),
    (["--tradeoff", "=x"], "LABEL=DIR"),
])
def test_cli_rejects_bad_tradeoff_labels(tmp_path, argv, message):
    args = _parser().parse_args(["report", "--out", str(tmp_path / "R.md"), *argv])
    with pytest.raises(ValueError, match=message):
        args.func(args)

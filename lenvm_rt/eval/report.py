"""The results document (docs/RESULTS.md), written from the evaluation JSON records, never typed by hand.

    md = write_results({"lifebench": Path("eval_results/lifebench"), "tradeoff:gsm8k": Path("eval_results/gsm8k"),
                        "mre": ..., "length_tokens": ..., "head": Path("heads/h1")}, Path("docs/RESULTS.md"))

Sources (a directory holding the file, or the file itself):
  lifebench        lifebench_unguided.json and/or lifebench_guided.json (eval/lifebench.py summaries)
  tradeoff[:LABEL] tradeoff.json (eval/tradeoff.py); any number of labelled ones ("tradeoff:gsm8k")
  mre              mre.json (eval/mre.py)
  length_tokens    length_tokens.json (eval/length_tokens.py)
  head             manifest.json of a trained value head (train_head.py / train_full.py)
  rule:LABEL       lifebench_guided.json of a run labelled LABEL (any number: the length-rule comparison), compared
                   with the lifebench_unguided.json beside it when there is one
  rule_baseline    lifebench_unguided.json of the same units and targets as rule runs without their own
With lifebench, a quality-bar table (eval/report_bars.py) follows the LIFEBench tables.
Contract: every number comes from those files. A section whose source is absent says "not run"; a file that
is not valid JSON, or lacks the keys its writer puts there, raises ValueError naming the file. The paper's
numbers (LENVM.md §5, §8) stand beside ours, labelled as such. Text quality (the policy's own NLL per token and
the share of repeated 4-grams, lenvm_rt/quality.py) stands beside every length score and trade-off row, guided
and unguided with their difference; records written before those measures existed show —. PNGs found beside
a JSON are linked by paths relative to the output document. Returns the Markdown and writes it to `out`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .markdown import NA
from .markdown import delta as _delta
from .markdown import num as _f
from .markdown import pct as _pct
from .markdown import table as _table
from .report_bars import bars_section, rules_section

__all__ = ["write_results"]

DEFAULT_TITLE = "LenVM runtime: results"
SOURCES = ("lifebench", "tradeoff", "mre", "length_tokens", "head", "rule", "rule_baseline")
LABELLED = ("tradeoff", "rule")
FILES = {"tradeoff": "tradeoff.json", "mre": "mre.json", "length_tokens": "length_tokens.json", "head": "manifest.json",
         "rule": "lifebench_guided.json", "rule_baseline": "lifebench_unguided.json"}
# Paper Table 2: (Equal To |LD| %, Equal To LS, At Most LS, At Least LS), without -> with LenVM.
PAPER_LIFEBENCH = {"Qwen2.5-3B": ((83, 25.6, 92.1, 94.6), (56, 62.6, 93.0, 93.1)),
                   "Qwen2.5-7B": ((71, 30.9, 98.5, 89.1), (44, 64.8, 96.1, 99.5)),
                   "Qwen3-30B-A3B": ((90, 36.8, 87.0, 99.3), (57, 67.2, 99.4, 99.8))}
PAPER_FRONTIER = ("66% (Claude-Opus-4-6)", "53.2 (Claude-Opus-4-6-thinking)", "77.9 (GPT-4o)",
                  "100.0 (Claude-Sonnet/Opus-4-6, Gemini-3.1-Pro)")
# Paper Fig. 2a, GSM8K, Qwen2.5-3B-Instruct + LenVM(1.5B): (mean tokens, pass@1) read off the plot.
PAPER_TILT = {-1000.0: (200, 0.63), -100.0: (263, 0.76), -50.0: (296, 0.80), -20.0: (320, 0.81), 0.0: (340, 0.815)}
PAPER_BUDGET = {200: (200, 0.05), 250: (243, 0.19), 300: (278, 0.36), 350: (302, 0.545), 400: (317, 0.67),
                450: (327, 0.735), None: (340, 0.815)}
# Paper Table 3: prompt-boundary MRE % per LenVM size, (math, code, IF).
PAPER_MRE = {"1.5B": (17.0, 29.0, 33.0), "3B": (13.6, 24.0, 27.2), "7B": (11.0, 19.5, 23.0),
             "14B": (10.4, 17.0, 19.8), "32B": (9.8, 14.9, 17.1)}
Loaded = tuple[Path, dict[str, Any]]
QUALITY_NOTE = ("NLL: the policy's own mean negative log-likelihood per token (nats, EOS included) of the outputs, "
                "judged unguided at temperature 1 (lower: text the policy finds likelier); ΔNLL = guided − unguided; "
                "rep4: share of repeated token 4-grams. Summaries written before these measures existed show —.")


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object; got {type(data).__name__}")
    return data


def _code(text: Any) -> str:
    s = str(text)
    return f"`` {s} ``" if "`" in s else f"`{s}`"


def _token(token: str) -> str:
    return _code(repr(token)[1:-1] if not token.strip() else token)


def _png(json_path: Path, name: str, out: Path, caption: str) -> list[str]:
    png = json_path.parent / name
    if not png.is_file():
        return []
    rel = Path(os.path.relpath(png.resolve(), out.parent.resolve())).as_posix()
    return [f"![{caption}]({rel})", ""]


def _guard(path: Path, kind: str, render: Callable[..., list[str]], *args: Any) -> list[str]:
    try:
        return render(*args)
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:
        raise ValueError(f"{path}: not a {kind} record as lenvm_rt writes it ({type(exc).__name__}: {exc})") from exc


def _setup(loaded: Sequence[tuple[str, Path, dict[str, Any]]], command: str | None) -> list[str]:
    rows, commands = [], []
    for name, path, rec in loaded:
        cfg, machine, ver = rec.get("config", {}), rec.get("machine") or {}, rec.get("versions") or {}
        model = cfg.get("model") or cfg.get("policy") or rec.get("policy")
        value = cfg.get("value_model") or (str(path.parent) if name == "head" else None)
        hw = f"{machine['cpu']}, {machine.get('cores')} cores" if machine.get("cpu") else NA
        if machine.get("gpu"):
            hw += f", GPU {machine['gpu']}"
        if cfg.get("device"):
            hw += f" (run on {cfg['device']}, {cfg.get('dtype', '?')})"
        versions = ", ".join(f"{k} {v if k != 'git_sha' else str(v)[:10]}" for k, v in ver.items() if v) or NA
        gamma = cfg.get("gamma", rec.get("gamma"))
        rows.append([name, _code(path), rec.get("timestamp", NA), _code(model) if model else NA,
                     _code(value) if value else NA, _f(gamma, "g"), hw, versions])
        cmd = rec.get("command") or cfg.get("command")
        if cmd:
            commands.append(f"- {name}: `{cmd if isinstance(cmd, str) else ' '.join(map(str, cmd))}`")
    lines = ["## Setup", ""]
    if not rows:
        return lines + ["No source given: every section below is not run.", ""]
    lines += _table(["run", "record", "date", "model", "value head", "γ", "machine", "versions"], rows)
    lines += ["Commands recorded in the JSON:", "", *commands, ""] if commands else [
        "No record holds its command line; the settings shown in each section are the recorded ones.", ""]
    return lines + ([f"This document: `{command}`", ""] if command else [])


def _lifebench(runs: dict[str, Loaded], out: Path) -> list[str]:
    modes = [m for m in ("unguided", "guided") if m in runs]
    res = {m: runs[m][1]["results"] for m in modes}
    cfg = {m: runs[m][1]["config"] for m in modes}
    constraints = [c for c in ("equal", "at_most", "at_least") if any(c in res[m]["scores"] for m in modes)]
    lines = []
    for m in modes:
        c = cfg[m]
        # The rules of the constraints the run has; summaries record the At Most / At Least rules only when they
        # are not the paper's (strict).
        names = {"equal": "Equal To", "at_most": "At Most", "at_least": "At Least"}
        ran = [k for k in names if k in res[m]["scores"]]
        rules = ("rules: " + ", ".join(f"{names[k]} {c.get(k + '_rule', 'strict')}" for k in ran) + ", "
                 if c.get("guided") and ran else "")
        lines.append(f"- {m}: {c['units']} units of `{Path(str(c.get('data'))).name}`, targets {c['targets']}, "
                     f"{rules}sampling {json.dumps(c.get('sampling'))}, "
                     f"counts {json.dumps(res[m]['counts'])}, malformed data lines {len(res[m]['malformed_lines'])}")
    lines += ["", "Length score (LS, 0–100) and mean |LD| per constraint and target, token level:", ""]

    def cell(m: str, c: str, t: str, key: str) -> Any:
        return res[m]["scores"].get(c, {}).get(t, {}).get(key) if m in res else None

    both = ("unguided", "guided")
    rows = []
    for c in constraints:
        targets = sorted({int(t) for m in modes for t in res[m]["scores"].get(c, {})})
        for t in map(str, targets):
            nll = [cell(m, c, t, "nll") for m in both]
            rows.append([c, t, *(_f(cell(m, c, t, "length_score")) for m in both),
                         *(_f(cell(m, c, t, "deviation_pct"), suffix="%") for m in both),
                         " / ".join(_f(cell(m, c, t, "scored"), "d") for m in both),
                         *(_f(v, ".3f") for v in nll), _delta(nll, "+.3f"),
                         *(_pct(cell(m, c, t, "repetition_rate")) for m in both)])
    lines += _table(["constraint", "target", "LS unguided", "LS guided", "|LD| unguided", "|LD| guided",
                     "scored (unguided / guided)", "NLL unguided", "NLL guided", "ΔNLL", "rep4 unguided",
                     "rep4 guided"], rows)
    lines += [QUALITY_NOTE, ""]
    metrics = [("equal", "deviation_pct", "Equal To |LD| ↓", 0), ("equal", "length_score", "Equal To LS ↑", 1),
               ("at_most", "length_score", "At Most LS ↑", 2), ("at_least", "length_score", "At Least LS ↑", 3),
               ("at_most", "deviation_pct", "At Most |LD|", None), ("at_least", "deviation_pct", "At Least |LD|", None)]
    avg_rows = []
    for c, key, label, i in metrics:
        ours = [res[m]["averages"].get(c, {}).get(key) if m in res else None for m in ("unguided", "guided")]
        suffix = "%" if key == "deviation_pct" else ""
        delta = _f(ours[1] - ours[0], "+.1f", " pp" if suffix else "") if None not in ours else NA
        paper = [NA if i is None else f"{p[0][i]}{suffix} → {p[1][i]}{suffix}" for p in PAPER_LIFEBENCH.values()]
        avg_rows.append([label, *(_f(v, suffix=suffix) for v in ours), delta, *paper,
                         NA if i is None else PAPER_FRONTIER[i]])
    for key, label in (("nll", "NLL (policy, all cells) ↓"), ("repetition_rate", "rep4 (all cells) ↓")):
        ours = [res[m].get("quality", {}).get("all", {}).get(key) if m in res else None for m in both]
        cells = [_f(v, ".3f") for v in ours] if key == "nll" else [_pct(v) for v in ours]
        delta = _delta(ours, "+.3f") if key == "nll" else _delta([None if v is None else 100 * v for v in ours],
                                                                 "+.1f", " pp")
        avg_rows.append([label, *cells, delta, *([NA] * len(PAPER_LIFEBENCH)), NA])
    lines += ["Averages over targets, beside the paper (Table 2; paper cells: without → with LenVM(1.5B/1.7B)):", ""]
    lines += _table(["metric", "ours unguided", "ours guided", "Δ", *(f"paper {k}" for k in PAPER_LIFEBENCH),
                     "paper best frontier"], avg_rows)
    lines.append("The paper samples at temperature 1.0, top-p 0.999, top-k 15 on 360 units; ours uses the settings "
                 "above, so compare directions, not digits.")
    return lines + [""] + _png(runs[modes[0]][0], "lifebench_scores.png", out, "LIFEBench length score per target")


def _kind(text: Any) -> str | None:
    low = str(text or "").lower()
    return "GSM8K" if "gsm8k" in low or "grade" in low else "generated arithmetic" if "arith" in low else None


def _dataset(rec: dict[str, Any], label: str) -> tuple[str, str]:
    """(kind, how it is known): from the recorded data path, else the question ids, else the label."""
    data = rec["config"].get("data")
    if data:
        return _kind(data) or "other", f"data path `{data}`"
    ids = {str(s["id"]) for s in rec["results"].get("samples", [])}
    if ids and all(i.startswith("arith-") for i in ids):
        return "generated arithmetic", "question ids `arith-*`; the record holds no data path"
    if _kind(label):
        return str(_kind(label)), f"label `{label}`; the record holds no data path"
    return "unknown", "the record holds no data path"


def _tradeoff(label: str, path: Path, rec: dict[str, Any], out: Path) -> list[str]:
    cfg, res = rec["config"], rec["results"]
    kind, how = _dataset(rec, label)
    gsm8k = kind == "GSM8K"
    lines = [f"### {label}", "", f"Data set: **{kind}** ({how}); {cfg['questions']} questions × {cfg['samples']} "
             f"samples, max_new_tokens {cfg['max_new_tokens']}, temperature {cfg['temperature']}, top-p "
             f"{cfg['top_p']}, min-p {cfg['min_p']}, top-k {cfg['top_k'] if cfg['top_k'] is not None else 'default'}"
             f", seed {cfg['seed']}.", f"Answer extraction: {res['answer_extraction']}. Length: "
             f"{res['length_counter']}.", ""]

    def paper(point: tuple[int, float] | None) -> list[str]:
        return [f"({point[0]}, {point[1]:.3f})" if point else NA] if gsm8k else []

    def quality(p: dict[str, Any]) -> list[str]:
        return [_f(p.get("nll"), ".3f"), _delta([u.get("nll"), p.get("nll")], "+.3f"), _pct(p.get("repetition_rate"))]

    u = res["unguided"]
    rows = [["tilt", f"β = {p['beta']:g}", _f(p["accuracy"], ".3f"), _f(p["mean_tokens"]), *quality(p), p["count"],
             f"{p['cut']} cut", *paper(PAPER_TILT.get(float(p["beta"])))] for p in res["tilt"]]
    rows += [["hard budget", f"B = {p['budget']}", _f(p["accuracy"], ".3f"), _f(p["mean_tokens"]), *quality(p),
              p["count"], f"{p['over_budget']} over B", *paper(PAPER_BUDGET.get(int(p["budget"])))]
             for p in res["hard_budget"]]
    rows.append(["unguided", "B = ∞", _f(u["accuracy"], ".3f"), _f(u["mean_tokens"]), *quality(u), u["count"],
                 f"{u['cut']} cut", *paper(PAPER_BUDGET[None])])
    for p in res.get("at_most", []):
        t = p["truncated"]
        rows += [["LenVM at most", f"N = {p['target']}", _f(p["accuracy"], ".3f"), _f(p["mean_tokens"]), *quality(p),
                  p["count"], f"{p['over_target']} over N", *paper(None)],
                 ["unguided, cut at N", f"B = {t['budget']}", _f(t["accuracy"], ".3f"), _f(t["mean_tokens"]),
                  *quality(u), t["count"], f"{t['over_budget']} over B", *paper(None)]]
    lines += _table(["method", "setting", "pass@1", "mean tokens", "NLL", "ΔNLL vs unguided", "rep4", "samples",
                     "cut / over", *(["paper Fig. 2a (tokens, pass@1)"] if gsm8k else [])], rows)
    lines += [QUALITY_NOTE.replace("ΔNLL = guided − unguided", "ΔNLL = row − unguided; budget rows: the unguided "
                                   "responses, whole"), ""]
    if gsm8k:
        lines += ["Paper: Qwen2.5-3B-Instruct + LenVM(1.5B), 64 samples, points read off Fig. 2a (±0.01, ±5 tokens); "
                  "headline 63% pass@1 at β = −1000 (≈200 tokens) vs ≈6% at hard budget B = 200.", ""]
    else:
        lines += ["The paper reports no numbers on this data set (its Fig. 2a is GSM8K).", ""]
    return lines + _png(path, "tradeoff.png", out, f"Trade-off ({label})")


def _paper_domain(domain: str) -> int | None:
    d = domain.lower()
    return 0 if d.startswith("math") else 1 if d.startswith("code") else 2 if d == "if" or d.startswith(
        "instr") else None


def _mre(path: Path, rec: dict[str, Any], out: Path) -> list[str]:
    cfg, res = rec["config"], rec["results"]
    lines = [f"{res['prompts']} prompts × {cfg['samples']} completions (cap {cfg['max_tokens']} tokens, "
             f"{cfg['sampling']}), γ = {cfg['gamma']}; cut completions {res['cut_completions']}/{res['completions']} "
             f"({_pct(res['cut_share'])}); L_GT = {cfg['ground_truth']}.", ""]
    rows = [["all", _pct(res["mre"]), _pct(res["mre_median"]), *([NA] * len(PAPER_MRE))]]
    for d, v in res["mre_by_domain"].items():
        i = _paper_domain(d)
        rows.append([d, _pct(v), NA, *(NA if i is None else f"{p[i]:.1f}%" for p in PAPER_MRE.values())])
    lines += _table(["domain", "MRE", "median", *(f"paper {k}" for k in PAPER_MRE)], rows)
    lines.append("Paper: Table 3, LenVM sizes on held-out math / code / instruction-following prompts, N = 64.")
    lines.append("")
    if res.get("position_rel_error"):
        lines += ["Relative error along the completion (completions that ended: "
                  f"{res.get('position_completions', NA)}):", ""]
        lines += _table(["position", "relative error"], [[k, _pct(v)] for k, v in res["position_rel_error"].items()])
    return lines + _png(path, "mre.png", out, "Predicted vs ground-truth length")


def _head(path: Path, man: dict[str, Any]) -> list[str]:
    s, data = man["settings"], man["data"]
    lines = [f"Mode **{man['mode']}**, policy `{man['policy']}`, γ = {man['gamma']} ({man['gamma_rule']}); "
             f"epochs {s['epochs']}, batch {s['batch']}, lr {s['lr']}, censoring {s['censoring']}, seed {s['seed']}."]
    for split in ("train", "val"):
        d = data[split]
        lines.append(f"- {split}: `{d['rollouts']}`: {d['completions']} completions of {d['prompts']} prompts, "
                     f"{d['censored']} censored, {d['dropped']} dropped, {d['positions']} trained positions")
    history = man["history"]
    domains = sorted({k for h in history for k in h["val"]["mre_by_domain"]})
    positions = list(dict.fromkeys(k for h in history for k in h["val"]["position_rel_error"]))
    rows = [[h["epoch"], _f(h["train_loss"], ".5f"), _f(h["val"]["loss"], ".5f"), _pct(h["val"]["mre"]),
             _pct(h["val"].get("mre_median")), *(_pct(h["val"]["mre_by_domain"].get(d)) for d in domains),
             *(_pct(h["val"]["position_rel_error"].get(q)) for q in positions)] for h in history]
    lines += ["", "Validation per epoch (loss: token-mean ½·MSE; MRE at the prompt boundary):", ""]
    lines += _table(["epoch", "train loss", "val loss", "val MRE", "median", *(f"MRE {d}" for d in domains),
                     *(f"pos {q}" for q in positions)], rows)
    return lines + ["Paper Fig. 3, for scale: validation ½·MSE ≈ 0.009 (0.5B LenVM) → 0.005 (32B).", ""]


def _length_tokens(path: Path, rec: dict[str, Any], out: Path) -> list[str]:
    res = rec["results"]
    lines = [f"{res['completions']} completions ({res['given_responses']} given, {res['sampled_completions']} "
             f"sampled), {res['tokens']} tokens; |δ| > {res['threshold']}: {res['positive_tokens']} longer, "
             f"{res['negative_tokens']} shorter. δ_t = γ·u_t − u_(t−1) + (1 − γ); positive: longer.", ""]
    for field, name in (("positive", "Top longer tokens (δ > +threshold)"),
                        ("negative", "Top shorter tokens (δ < −threshold)")):
        rows = [[_token(t["token"]), t[field], t["count"], _pct(t["share"]), _f(t["mean_td"], "+.4f")]
                for t in res[field]]
        lines += [name + ":", ""] + (_table(["token", field, "count", "share", "mean δ"], rows) if rows else
                                     ["(none)", ""])
    lines += ["Paper (§4.6, Qwen3-30B-A3B on DeepMath): longer: ah, but, now, wait, let, think, try, consider; "
              "shorter: therefore, clearly, perfect, `\\n\\n`, the check-mark and party emoji.", ""]
    return lines + _png(path, "length_tokens.png", out, "Length tokens")


def _beside(guided: Path) -> Loaded | None:
    """The unguided LIFEBench summary in the same folder as a guided one, if there is one."""
    path = guided.parent / "lifebench_unguided.json"
    return (path, _load(path)) if guided.name == "lifebench_guided.json" and path.is_file() else None


def _not_run(what: str) -> list[str]:
    return [f"not run ({what})", ""]


def write_results(sources: Mapping[str, Path], out: Path, *, title: str = DEFAULT_TITLE,
                  command: str | None = None) -> str:
    """Render the results document from `sources` (see the module contract), write it to `out`, return it."""
    out = Path(out)
    for key in sources:
        if key.split(":", 1)[0] not in SOURCES or (":" in key and key.split(":", 1)[0] not in LABELLED):
            raise ValueError(f"unknown report source {key!r}; expected one of {', '.join(SOURCES)}, tradeoff:LABEL "
                             "or rule:LABEL")
    loaded: list[tuple[str, Path, dict[str, Any]]] = []
    found: dict[str, Loaded] = {}
    lifebench: dict[str, Loaded] = {}
    missing: dict[str, str] = {}
    for key, src in sources.items():
        src = Path(src)
        if key == "lifebench":
            paths = [src] if src.is_file() else [src / f"lifebench_{m}.json" for m in ("unguided", "guided")]
            for p in filter(Path.is_file, paths):
                rec = _load(p)
                if not isinstance(rec.get("config"), dict) or not isinstance(rec["config"].get("guided"), bool):
                    raise ValueError(f"{p}: not a LIFEBench summary record (no config.guided)")
                mode = "guided" if rec["config"]["guided"] else "unguided"
                lifebench[mode] = (p, rec)
                loaded.append((f"lifebench {mode}", p, rec))
            if not lifebench:
                missing[key] = f"no lifebench_unguided.json or lifebench_guided.json in `{src}`"
            continue
        p = src if src.is_file() else src / FILES[key.split(":", 1)[0]]
        if not p.is_file():
            missing[key] = f"no {p.name} in `{src}`"
            continue
        found[key] = (p, _load(p))
        loaded.append((key, *found[key]))
    lines = [f"# {title}", "", "Generated by `lenvm_rt.eval.report` from the JSON records listed under Setup; "
             "regenerate it rather than editing it. Paper numbers are from LENVM.md §5 and §8.", ""]
    lines += _setup(loaded, command)
    lines += ["## LIFEBench (token level)", ""]
    lines += (_guard(next(iter(lifebench.values()))[0], "LIFEBench", _lifebench, lifebench, out) if lifebench
              else _not_run(missing.get("lifebench", "no --lifebench source")))
    if lifebench:
        lines += ["### Quality bars", "", "Checked on the averages above (guided against unguided, same prompts):", ""]
        lines += bars_section(*(lifebench[m][1]["results"] if m in lifebench else None
                                for m in ("unguided", "guided")))
    rules = {k.split(":", 1)[1]: (*found[k], _beside(found[k][0])) for k in sources
             if k.startswith("rule:") and k in found}
    if rules:
        lines += ["### Length rules compared", "", "Guided runs that differ in their length rule or sampling, on the "
                  "units and targets listed (LIFEBench LS averaged over targets). Unguided LS, ΔNLL and Δrep4 are "
                  "against the unguided run of the same units, targets and sampling (`lifebench_unguided.json` "
                  "beside the guided summary, else the rule baseline):", ""]
        lines += rules_section(rules, found.get("rule_baseline"))
    lines += ["## Performance–efficiency trade-off", ""]
    tradeoffs = [k for k in sources if k.split(":", 1)[0] == "tradeoff"]
    for key in tradeoffs:
        label = key.split(":", 1)[1] if ":" in key else "tradeoff"
        lines += (_guard(found[key][0], "trade-off", _tradeoff, label, *found[key], out) if key in found
                  else [f"### {label}", ""] + _not_run(missing[key]))
    lines += [] if tradeoffs else _not_run("no --tradeoff source")
    sections: list[tuple[str, str, str, Callable[..., list[str]], bool]] = [
        ("mre", "Length prediction at the prompt boundary (MRE)", "MRE", _mre, True),
        ("head", "Value head training: validation history", "head manifest", _head, False),
        ("length_tokens", "Length tokens", "length-token", _length_tokens, True)]
    for key, heading, kind, render, with_out in sections:
        lines += [f"## {heading}", ""]
        if key in found:
            lines += _guard(found[key][0], kind, render, *found[key], *([out] if with_out else []))
        else:
            lines += _not_run(missing.get(key, f"no --{key.replace('_', '-')} source"))
    text = "\n".join(lines).rstrip() + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return text

"""`lenvm_rt.sampling`: the top-k / top-p / min-p keep-set and the seeded inverse-CDF draw against a plain reference.

Reference, row by row in float64 from the same probabilities: top-k keeps every token at least as probable as the
k-th most probable (ties at the boundary all stay), top-p keeps a token when the mass of the tokens sorted before it
is <= top_p, min-p keeps p >= min_p * p_max, and the most probable token always stays. The draw takes the first token
whose running mass in vocabulary order exceeds u * total, u from Philox(seed, offset). Settings are drawn so that no
row sits within 1e-5 of a top-p boundary, where float32 and float64 sums could disagree.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lenvm_rt import Sampling, _native
from lenvm_rt.guidance import K_MAX, CandidateSettings, build_candidates
from lenvm_rt.sampling import TOP_P_HEAD, TokenChooser, filter_mask, top_p_mask

V = 200


def reference_keep(probs: np.ndarray, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    p = probs.astype(np.float64)
    keep = p >= min_p * p.max()
    if top_k > 0:
        keep &= p >= np.sort(p)[::-1][min(top_k, p.size) - 1]
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        before = np.concatenate(([0.0], np.cumsum(p[order])[:-1]))
        in_top_p = np.zeros_like(keep)
        in_top_p[order] = before <= top_p
        keep &= in_top_p
    return keep | (p >= p.max())


def top_p_margin(probs: np.ndarray, top_p: float) -> float:
    """Distance of top_p from the nearest exclusive prefix mass of the row (inf when top-p is off)."""
    if top_p >= 1:
        return float("inf")
    p = np.sort(probs.astype(np.float64))[::-1]
    return float(np.abs(np.concatenate(([0.0], np.cumsum(p)[:-1])) - top_p).min())


def random_rows(seed: int, rows: int) -> tuple[torch.Tensor, list[Sampling]]:
    gen = np.random.default_rng(seed)
    logits = torch.from_numpy((gen.standard_normal((rows, V)) * gen.uniform(0.5, 4.0, (rows, 1))).astype(np.float32))
    logits[0, 7:10] = logits[0].max() + 1.0  # three tied most probable tokens
    logits[1, 20:26] = 2.5  # ties around a top-k boundary
    samplings = [Sampling(temperature=float(gen.choice([0.5, 1.0, 1.7])), seed=int(gen.integers(1 << 40)),
                          top_k=int(gen.choice([0, 1, 3, 5, 40])), top_p=float(gen.choice([1.0, 0.9, 0.5])),
                          min_p=float(gen.choice([0.0, 0.05, 0.3])))
                 for _ in range(rows)]
    return logits, samplings


@pytest.mark.parametrize("seed", range(4))
def test_keep_set_and_draw_match_the_reference(seed: int) -> None:
    logits, samplings = random_rows(seed, 12)
    chooser = TokenChooser(samplings, torch.device("cpu"))
    probs = torch.softmax(logits * chooser.inv_temperature, dim=-1)
    keep = filter_mask(probs, chooser.top_k, chooser.top_p, chooser.min_p, k_max=chooser._k_max,
                       use_top_p=chooser._use_top_p)
    offsets = list(range(3, 3 + len(samplings)))
    drawn = chooser(logits, offsets).tolist()
    uniform = _native.philox_uniform(chooser.seeds, np.array(offsets, dtype=np.uint32), 0)
    checked = 0
    for b, s in enumerate(samplings):
        row = probs[b].numpy()
        if top_p_margin(row, s.top_p) < 1e-5:
            continue
        expected = reference_keep(row, s.top_k or 0, s.top_p, s.min_p)
        np.testing.assert_array_equal(keep[b].numpy(), expected, err_msg=f"row {b}: {s}")
        kept = np.where(expected, row.astype(np.float64), 0.0)
        running = np.cumsum(kept)
        target = float(uniform[b]) * running[-1]
        if np.abs(running - target).min() < 1e-5 * running[-1]:
            continue  # the draw sits on a boundary between two tokens
        assert drawn[b] == int(np.searchsorted(running, target, side="right")), (b, s)
        assert expected[drawn[b]]
        checked += 1
    assert checked >= 8  # the margins skip only the rare row


def test_boundary_ties_and_the_top_token_always_stay() -> None:
    probs = torch.tensor([[0.3, 0.2, 0.2, 0.2, 0.1]])
    keep = filter_mask(probs, torch.tensor([2]), torch.tensor([1.0]), torch.tensor([0.0]), k_max=2, use_top_p=False)
    assert keep.tolist() == [[True, True, True, True, False]]  # the three tied at rank 2 all stay
    keep = filter_mask(probs, torch.tensor([0]), torch.tensor([0.0]), torch.tensor([0.99]), k_max=0, use_top_p=True)
    assert keep.tolist() == [[True, False, False, False, False]]  # top-p 0 and min-p 0.99 still keep the top token


def test_top_k_one_draws_a_most_probable_token() -> None:
    logits, _ = random_rows(9, 6)  # row 0 has three tied most probable tokens, which top-k 1 all keeps
    samplings = [Sampling(temperature=1.3, seed=5 + b, top_k=1) for b in range(6)]
    chooser = TokenChooser(samplings, torch.device("cpu"))
    drawn_in_row0 = set()
    for step in range(12):
        drawn = chooser(logits, [step] * 6)
        assert torch.equal(logits.gather(1, drawn.view(-1, 1)).squeeze(1), logits.max(dim=-1).values)
        assert drawn[1:].tolist() == logits[1:].argmax(dim=-1).tolist()
        drawn_in_row0.add(int(drawn[0]))
    assert drawn_in_row0 <= {7, 8, 9} and len(drawn_in_row0) > 1


def test_top_p_one_keeps_the_whole_row_beside_a_top_p_row() -> None:
    """A float32 running sum can pass 1 before the row's tail; top-p 1 still means no top-p filter, so a row draws
    from the same set alone and beside a row that uses top-p."""
    logits = (torch.randn(1, V, generator=torch.Generator().manual_seed(0)) * 8).expand(2, V)
    probs = torch.softmax(logits, dim=-1)
    sorted_p = probs[0].sort(descending=True).values
    assert float((sorted_p.cumsum(0) - sorted_p).max()) > 1.0  # the case: the sum passes 1 inside the row
    keep = filter_mask(probs, torch.tensor([0, 0]), torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.0]), k_max=0,
                       use_top_p=True)
    assert bool(keep[0].all()) and int(keep[1].sum()) < V
    alone = filter_mask(probs[:1], torch.tensor([0]), torch.tensor([1.0]), torch.tensor([0.0]), k_max=0,
                        use_top_p=False)
    assert torch.equal(keep[:1], alone)


def test_candidate_builder_with_top_p_one_keeps_every_slot_when_the_sum_passes_one() -> None:
    logits = torch.full((1, 256), -80.0)
    logits[0, 1:K_MAX + 1] = torch.randn(K_MAX, generator=torch.Generator().manual_seed(3)) * 4
    settings = CandidateSettings.of([Sampling(top_k=K_MAX)], [0], torch.device("cpu"))
    p = torch.log_softmax(logits, dim=-1).topk(K_MAX).values.exp()
    assert float((p.cumsum(-1) - p).max()) > 1.0  # the case: the float32 prefix sum passes 1 within the slots
    ids, logp, filled = build_candidates(logits, settings, None)
    assert bool(filled.all()) and sorted(ids[0].tolist()) == list(range(1, K_MAX + 1))
    assert bool(torch.isfinite(logp).all())


def full_sort_top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The top-p keep-mask from a sort of the whole row (what top_p_mask computes when it cannot stop early)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep_sorted = (sorted_p.cumsum(dim=-1) - sorted_p <= top_p.view(-1, 1)) | (top_p.view(-1, 1) >= 1)
    return torch.empty_like(probs, dtype=torch.bool).scatter_(1, order, keep_sorted)


@pytest.mark.parametrize("flat_row", [False, True], ids=["head-only", "sorts-whole-rows"])
def test_top_p_from_the_head_equals_the_full_sort(flat_row: bool, monkeypatch) -> None:
    """Peaked rows settle inside the TOP_P_HEAD most probable tokens; a flat row (mass 0.9 needs thousands of
    tokens) sends the batch to the full sort. Both give the full sort's mask bit for bit, and the reference's."""
    V = 8 * TOP_P_HEAD
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(4, V, generator=gen) * torch.tensor([[6.0], [4.0], [8.0], [5.0]])
    if flat_row:
        logits[2] = torch.randn(V, generator=gen) * 0.1
    probs = torch.softmax(logits, dim=-1)
    top_p = torch.tensor([0.9, 0.5, 0.95, 1.0])
    head_p = probs.topk(TOP_P_HEAD, dim=-1).values
    settles = bool(((head_p.cumsum(-1) - head_p)[:3, -1] > top_p[:3]).all())
    assert settles != flat_row  # the case the parametrisation names
    expected = full_sort_top_p(probs, top_p)
    sorts = []
    real_sort = torch.Tensor.sort
    monkeypatch.setattr(torch.Tensor, "sort", lambda t, *a, **k: sorts.append(1) or real_sort(t, *a, **k))
    keep = top_p_mask(probs, top_p)
    assert torch.equal(keep, expected) and bool(sorts) == flat_row  # the head alone sorts nothing
    assert bool(keep[3].all()) and (int(keep[2].sum()) > TOP_P_HEAD) == flat_row
    for b in range(4):
        if top_p_margin(probs[b].numpy(), float(top_p[b])) > 1e-5:
            np.testing.assert_array_equal(keep[b].numpy(), reference_keep(probs[b].numpy(), 0, float(top_p[b]), 0.0))


def test_temperature_one_draws_as_the_scaled_formula() -> None:
    """At temperature 1 the chooser skips the scaling; its draws equal those of the same rows with the scaling
    forced (a 1.0 temperature among rows of other temperatures)."""
    logits, _ = random_rows(4, 6)
    unit = [Sampling(temperature=1.0, seed=40 + b, top_p=0.9) for b in range(6)]
    chooser = TokenChooser(unit, torch.device("cpu"))
    scaled = TokenChooser(unit + [Sampling(temperature=0.5, seed=1)], torch.device("cpu"))
    assert chooser._unit_temperature and not scaled._unit_temperature
    padded = torch.cat((logits, logits[:1]))
    for step in range(4):
        assert chooser(logits, [step] * 6).tolist() == scaled(padded, [step] * 7).tolist()[:6]


def _settings(rng: np.random.Generator, n: int, *, top_k_alone: bool) -> list[Sampling]:
    out = []
    for i in range(n):
        top_k = int(rng.choice([1, 3, 15, 40])) if top_k_alone else int(rng.choice([0, 1, 5, 15, 40]))
        top_p = 1.0 if top_k_alone else float(rng.choice([1.0, 0.99, 0.9, 0.5]))
        min_p = float(rng.choice([0.0, 0.05, 0.3]))
        out.append(Sampling(temperature=float(rng.choice([0.0, 0.7, 1.0, 1.3])), top_k=top_k or None, top_p=top_p,
                            min_p=min_p, seed=i))
    return out


@pytest.mark.parametrize("top_k_alone", [True, False])
def test_head_draw_equals_the_whole_row_draw(top_k_alone):
    """The draw from the few most probable tokens is the whole row's draw, token for token, over many uniforms; a row
    whose keep set reaches the head's last token sends the batch to the whole-row path."""
    rng = np.random.default_rng(7 + top_k_alone)
    B, width = 48, 3000
    logits = torch.from_numpy(rng.standard_normal((B, width)).astype(np.float32)) * torch.from_numpy(
        rng.choice([1.0, 4.0, 9.0], size=(B, 1)).astype(np.float32))  # flat to peaked rows
    logits[:4, :6] = logits[:4, :1]  # ties at the top, across small top-k boundaries
    samplings = _settings(rng, B, top_k_alone=top_k_alone)
    chooser = TokenChooser(samplings, torch.device("cpu"))
    assert chooser.head == (41 if top_k_alone else TOP_P_HEAD)
    probs = torch.softmax(logits * chooser.inv_temperature, dim=-1)
    groups = [list(range(b, b + 4)) for b in range(0, B, 4)]  # small batches: some settle in the head, some not
    used = {True: 0, False: 0}
    for rows in groups:
        sub = TokenChooser([samplings[b] for b in rows], torch.device("cpu"))
        for trial in range(40):
            u = torch.from_numpy(rng.random((len(rows), 1), dtype=np.float32))
            whole = sub._draw_from_row(probs[rows], u)
            head = sub._draw_from_head(probs[rows], u)
            used[head is not None] += 1
            if head is not None:
                sampled = ~sub.greedy_rows
                assert torch.equal(head[sampled], whole[sampled]), (rows, trial)
    assert used[True] > 0 and (used[False] > 0 or top_k_alone)


def test_head_draw_steps_aside_for_ties_beyond_the_head():
    chooser = TokenChooser([Sampling(temperature=1.0, top_k=2, seed=0)], torch.device("cpu"))
    assert chooser.head == 3
    logits = torch.zeros(1, 50)
    logits[0, [4, 9, 30]] = 5.0  # three tokens tie for the top: top-k 2 keeps all three
    probs = torch.softmax(logits, dim=-1)
    u = torch.tensor([[0.99]])
    assert chooser._draw_from_head(probs, u) is None
    assert int(chooser._draw_from_row(probs, u)) == 30 and int(chooser(logits, [0])) in (4, 9, 30)

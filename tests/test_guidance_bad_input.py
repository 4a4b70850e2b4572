"""Guided selection with bad input: the C++ core and its facade (`_native.GuidanceBatch`) reject malformed steps
and settings with a ValueError or IndexError naming the argument (and the row), advance nothing, and keep working;
a fuzz test throws random shapes, dtypes and values at `step`.
"""

from __future__ import annotations

import numpy as np
import pytest
from guidance_cases import EOS, check_valid
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lenvm_rt import _core, _native
from lenvm_rt.select_ref import AT_MOST, EQUAL, TILT


def fresh_batch(core: bool = False):
    batch = _core.GuidanceBatch(6, EOS) if core else _native.GuidanceBatch(6, EOS)
    for slot, rule in enumerate((EQUAL, AT_MOST, TILT)):
        if core:
            batch.admit(slot, rule, 5, 10, 0.9, -3.0, slot, False)
        else:
            batch.admit(slot, rule=rule, target=5, max_new=10, gamma=0.9, beta=-3.0, seed=slot)
    return batch


def clean_args() -> dict:
    rng = np.random.default_rng(11)
    return dict(rows=np.array([0, 1, 2], np.int32), cand_ids=np.array([[5, 2, 9, -1]] * 3, np.int32),
                cand_logp=np.full((3, 4), -1.5, np.float32), cand_z=rng.normal(0, 2, (3, 4)).astype(np.float32),
                out_slot=np.zeros(3, np.int32), out_token=np.zeros(3, np.int32), out_done=np.zeros(3, np.uint8))


def _set(name, index, value):
    def corrupt(a):
        a[name][index] = value
    return corrupt


def _replace(name, make):
    def corrupt(a):
        a[name] = make(a[name])
    return corrupt


def _readonly(x):
    x.flags.writeable = False
    return x


BAD_STEPS = {
    "logp shorter than ids": (_replace("cand_logp", lambda x: x[:, :-1].copy()), ValueError, r"cand_logp: .*\[3, 4\]"),
    "rows longer than ids": (_replace("rows", lambda x: np.array([0, 1, 2, 3], np.int32)), ValueError, "cand_ids"),
    "short output": (_replace("out_done", lambda x: x[:2].copy()), ValueError, "out_done"),
    "3-D ids": (_replace("cand_ids", lambda x: x[:, :, None].copy()), ValueError, "cand_ids"),
    "no candidate slots": (_replace("cand_ids", lambda x: x[:, :0].copy()), ValueError, "cand_logp"),
    "NaN value logit": (_set("cand_z", (1, 2), np.nan), ValueError, r"cand_z\[1, 2\]: .*not NaN"),
    "infinite logp": (_set("cand_logp", (2, 0), np.inf), ValueError, r"cand_logp\[2, 0\]: expected a finite"),
    "-inf logp": (_set("cand_logp", (0, 1), -np.inf), ValueError, r"cand_logp\[0, 1\]"),
    "empty candidate set": (_set("cand_ids", (1, 0), -1), ValueError, r"cand_ids\[1, 0\]: .*slot 0"),
    "filled after empty": (_set("cand_ids", (0, 1), -1), ValueError, r"cand_ids\[0, 2\]: .*precede"),
    "negative id": (_set("cand_ids", (2, 1), -5), ValueError, r"cand_ids\[2, 1\]"),
    "int64 ids": (_replace("cand_ids", lambda x: x.astype(np.int64)), ValueError, "cand_ids: .*int32.*got .*int64"),
    "float64 z": (_replace("cand_z", lambda x: x.astype(np.float64)), ValueError, "cand_z: .*float32"),
    "strided z": (_replace("cand_z", lambda x: np.repeat(x, 2, axis=1)[:, ::2]), ValueError, "cand_z: .*C-contig"),
    "list rows": (_replace("rows", lambda x: x.tolist()), ValueError, "rows: expected a numpy int32 array"),
    "bool done": (_replace("out_done", lambda x: x.astype(bool)), ValueError, "out_done: .*uint8"),
    "free slot": (_set("rows", 2, 4), ValueError, r"rows\[2\]: expected an active slot"),
    "duplicate slot": (_set("rows", 1, 0), ValueError, r"rows\[1\]: expected distinct"),
    "slot past the table": (_set("rows", 0, 6), IndexError, r"rows\[0\]: expected a slot in \[0, 6\)"),
    "negative slot": (_set("rows", 2, -1), IndexError, r"rows\[2\]"),
    "output aliases rows": (lambda a: a.update(out_slot=a["rows"]), ValueError, "out_slot: expected memory disjoint"),
    "read-only output": (_replace("out_token", _readonly), ValueError, "out_token: expected a writeable"),
}


@pytest.mark.parametrize("case", list(BAD_STEPS))
def test_step_rejects_bad_input_naming_it_and_keeps_working(case) -> None:
    corrupt, error, pattern = BAD_STEPS[case]
    batch, args = fresh_batch(), clean_args()
    corrupt(args)
    outputs = [args[name].copy() for name in ("out_slot", "out_token", "out_done")]
    with pytest.raises(error, match=pattern):
        batch.step(**args)
    for name, before in zip(("out_slot", "out_token", "out_done"), outputs):
        assert np.array_equal(args[name], before), f"{name} was written by a failed step"
    assert [batch.generated(s) for s in range(3)] == [0, 0, 0]
    batch.step(**clean_args())
    assert [batch.generated(s) for s in range(3)] == [1, 1, 1]


BAD_ADMITS = [
    (dict(target=0), ValueError, "target: expected an integer >= 1"),
    (dict(target=-3), ValueError, "target"),
    (dict(rule=0), ValueError, "rule"),
    (dict(rule=9), ValueError, "rule"),
    (dict(gamma=0.0), ValueError, "gamma: expected a number in \\(0, 1\\)"),
    (dict(gamma=1.0), ValueError, "gamma"),
    (dict(gamma=float("nan")), ValueError, "gamma"),
    (dict(beta=float("inf")), ValueError, "beta"),
    (dict(beta=1e31), ValueError, "beta"),
    (dict(max_new=0), ValueError, "max_new"),
    (dict(slot=6), IndexError, r"slot: expected a slot in \[0, 6\)"),
    (dict(slot=-1), IndexError, "slot"),
    (dict(slot=1), ValueError, "slot: expected a free slot"),
]


@pytest.mark.parametrize("core", [False, True], ids=["facade", "core"])
@pytest.mark.parametrize(("change", "error", "pattern"), BAD_ADMITS)
def test_admit_rejects_bad_settings_in_facade_and_core(change, error, pattern, core) -> None:
    batch = fresh_batch(core)
    s = dict(slot=4, rule=EQUAL, target=5, max_new=10, gamma=0.9, beta=0.0, seed=0, greedy=False) | change
    with pytest.raises(error, match=pattern):
        batch.admit(*s.values()) if core else batch.admit(s.pop("slot"), **s)
    assert batch.active_count() == 3 and not batch.is_active(4)
    if not core:
        batch.step(**clean_args())


def test_facade_names_unknown_rule_strings_and_bad_types() -> None:
    batch = fresh_batch()
    with pytest.raises(ValueError, match="rule: expected one of"):
        batch.admit(4, rule="longest", target=5, max_new=10, gamma=0.9)
    with pytest.raises(ValueError, match="seed"):
        batch.admit(4, rule="tilt", target=5, max_new=10, gamma=0.9, seed=-1)
    with pytest.raises(ValueError, match="slot: expected an active slot"):
        batch.retire(5)
    for capacity, eos, pattern in ((0, EOS, "capacity"), (4, [], "eos_ids"), (4, [3, -1], "eos_ids")):
        with pytest.raises(ValueError, match=pattern):
            _native.GuidanceBatch(capacity, eos)
        with pytest.raises(ValueError, match=pattern):
            _core.GuidanceBatch(capacity, eos)


# --- (d) fuzz ---------------------------------------------------------------------------------------------------

dtypes = st.sampled_from([np.int32, np.int32, np.int32, np.int64, np.float32, np.uint8])
float_dtypes = st.sampled_from([np.float32, np.float32, np.float32, np.float64, np.int32])


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_step_fuzz_gives_a_clean_result_or_a_value_or_index_error(data) -> None:
    batch = fresh_batch()
    b = data.draw(st.integers(0, 5))
    k = data.draw(st.one_of(st.integers(0, 6), st.integers(60, 3000)))
    b2, k2 = data.draw(st.sampled_from([(b, k)] * 6 + [(b + 1, k), (b, k + 1), (max(b - 1, 0), k)]))

    def array(dtypes, shape, low: int, high: int):
        dtype = np.dtype(data.draw(dtypes))
        kind = dtype.kind
        elements = st.floats(width=8 * dtype.itemsize) if kind == "f" else st.integers(0 if kind == "u" else low, high)
        return data.draw(hnp.arrays(dtype, shape, elements=elements))

    ids = array(dtypes, (b, k), -3, 12)
    logp = array(float_dtypes, (b2, k), -3, 3)
    z = array(float_dtypes, (b, k2), -3, 3)
    rows = array(dtypes, (b,), -2, 7)
    outs = [np.zeros(b, np.int32), np.zeros(b2, np.int32), np.zeros(b, data.draw(st.sampled_from([np.uint8, bool])))]
    before = [batch.generated(s) for s in range(3)]
    try:
        batch.step(rows, ids, logp, z, *outs)
    except (ValueError, IndexError) as error:
        event(type(error).__name__)
        assert [batch.generated(s) for s in range(3)] == before
        return
    event("clean step")
    for i, slot in enumerate(rows):
        check_valid(int(outs[0][i]), int(outs[1][i]), bool(outs[2][i]), ids[i])
        assert batch.generated(int(slot)) == before[int(slot)] + 1

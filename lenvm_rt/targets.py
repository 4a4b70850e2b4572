"""Dense value targets of a completion and the choice of γ (LENVM.md §1, §3).

A completion of `length` tokens has states s_0 … s_length (s_0 ends at the last prompt token). When it
stopped (its last token is EOS, counted in length), n_i = length − i tokens remain after s_i and the
target is G_i = −(1 − γ^{n_i}); the state after EOS has n = 0 and G = 0.

A completion cut at the cap C (finish_reason "length") is censored: at least C − i tokens remain after
s_i, so where C − i ≥ H, with γ^H ≤ ε, the target is −1 within ε, and the last H states, whose
remainder is unknown, are masked out. It is never trained as if it had ended, unless
censoring="as-ended" reproduces the reference's behaviour.

    targets, mask = dense_targets(length, finish_reason, gamma)        # float64 [length + 1], bool
    gamma = p99_gamma(lengths)        # γ = 0.01^(1/L_0.99); cut completions count with their cap
    gamma = choose_gamma(rollouts)    # the p99 rule, or half the cap when over 1% were cut (below)
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .value_math import check_gamma

CENSOR_EPSILON = 0.01
CENSORING_MODES = ("censor", "as-ended")
GAMMA_RULE = "p99 of the training completions (half the cap when over 1% were cut)"


def censor_horizon(gamma: float, eps: float = CENSOR_EPSILON) -> int:
    """The smallest H with γ^H ≤ eps: beyond it a remainder is 'infinite' within eps."""
    check_gamma(gamma)
    return math.ceil(math.log(eps) / math.log(gamma))


def dense_targets(length: int, finish_reason: str, gamma: float, *, censoring: str = "censor"
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Targets G[length + 1] (float64) and a training mask for the states s_0 … s_length."""
    check_gamma(gamma)
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"a completion has at least one token; got length {length!r}")
    if finish_reason not in ("stop", "length"):
        raise ValueError(f"finish_reason must be 'stop' or 'length'; got {finish_reason!r}")
    if censoring not in CENSORING_MODES:
        raise ValueError(f"censoring must be one of {CENSORING_MODES}; got {censoring!r}")
    remaining = length - np.arange(length + 1, dtype=np.float64)  # n_i = length − i
    targets = -(1.0 - np.power(gamma, remaining))
    mask = np.ones(length + 1, dtype=bool)
    if finish_reason == "length" and censoring == "censor":
        mask = remaining >= censor_horizon(gamma)
        targets = np.where(mask, -1.0, targets)
    return targets, mask


def p99_gamma(lengths: Sequence[int], quantile: float = 0.99) -> float:
    """γ with 1 − γ^{L_q} = 0.99 for the q-quantile length L_q (paper §5.3)."""
    if len(lengths) == 0:
        raise ValueError("no completion lengths to choose γ from")
    level = float(np.quantile(np.asarray(lengths, dtype=np.float64), quantile))
    if level < 2:
        raise ValueError(f"the {quantile:.0%} length is {level:g} tokens; too short to choose γ")
    return 0.01 ** (1.0 / level)


def choose_gamma(rollouts: Sequence[Any]) -> float:
    """γ for training on completions with .length and .finish_reason.

    The p99 rule when at most 1% of them were cut at the cap. Otherwise L_0.99 lies beyond the cap and
    the rule would put the censoring horizon H at the cap itself, so that every cut completion, the
    longest ones, would drop out of training and bias the head short; instead γ = 0.01^(1/(C/2)) for
    the cap C, so H = C/2 and each cut completion still trains its first half with target −1.
    """
    if len(rollouts) == 0:
        raise ValueError("no completions to choose γ from")
    cut = [r.length for r in rollouts if r.finish_reason == "length"]
    if len(cut) <= 0.01 * len(rollouts):
        return p99_gamma([r.length for r in rollouts])
    return 0.01 ** (1.0 / max(2.0, min(cut) / 2.0))

"""LenVM value math (LENVM.md §1, §6), for floats, numpy arrays and torch tensors alike.

Every generated token costs -(1-γ); the return after a state with `l` tokens left (EOS counted) is
G = -(1 - γ^l). The runtime works in σ-space, u = σ(z) = -G ∈ (0, 1): larger u, longer horizon.

    value_of_length(l, γ)       u = 1 - γ^l = -expm1(l·ln γ)              (exact target of a length)
    logit_of_length(l, γ)       z = ln((1-γ^l)/γ^l)                       (head logit of a horizon)
    remaining_from_logit(z, γ)  l̂ = softplus(z) / (-ln γ)                 (stable inverse; use this)
    remaining_from_value(u, γ)  l̂ = ln(1-u) / ln γ                        (inverse of a stored u)
    gamma_from_lengths(L)       γ = 0.01^(1/L_p99)                          (paper §5.3 p99 rule)
    td_residual(u_prev, u, γ)   δ = γ·u - u_prev + (1-γ)                     (0 = exact progress, >0 longer)

`l` is a count of remaining tokens *including* EOS: l = 0 at the terminal state (u = 0).
Functions raise ValueError for γ outside (0, 1) and for negative lengths.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch

Num = TypeVar("Num", float, np.ndarray, torch.Tensor)


def check_gamma(gamma: float) -> float:
    """γ as a float in (0, 1), else ValueError."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 < float(gamma) < 1.0:
        raise ValueError(f"gamma must be a number in (0, 1); got {gamma!r}")
    return float(gamma)


def _lib(x):
    return torch if isinstance(x, torch.Tensor) else np


def value_of_length(length: Num, gamma: float) -> Num:
    """u = 1 - γ^l for l >= 0 remaining tokens."""
    log_g = math.log(check_gamma(gamma))
    if isinstance(length, (int, float)):
        if length < 0:
            raise ValueError(f"length must be >= 0; got {length!r}")
        return -math.expm1(length * log_g)
    return -_lib(length).expm1(length * log_g)


def logit_of_length(length: Num, gamma: float) -> Num:
    """The head logit z whose σ equals value_of_length(l, γ); -inf at l = 0.

    With a = -l·ln γ > 0, z = ln(e^a - 1) = a + ln(1 - e^-a), which never overflows.
    """
    log_g = math.log(check_gamma(gamma))
    if isinstance(length, (int, float)):
        if length < 0:
            raise ValueError(f"length must be >= 0; got {length!r}")
        a = -length * log_g
        return a + math.log(-math.expm1(-a)) if length > 0 else -math.inf
    lib = _lib(length)
    a = -length * log_g
    return a + lib.log(-lib.expm1(-a))


def remaining_from_logit(z: Num, gamma: float) -> Num:
    """l̂ = softplus(z) / (-ln γ): predicted remaining tokens from a head logit, stable for any z."""
    neg_log_g = -math.log(check_gamma(gamma))
    if isinstance(z, (int, float)):
        softplus = max(z, 0.0) + math.log1p(math.exp(-abs(z)))
        return softplus / neg_log_g
    if isinstance(z, torch.Tensor):
        return torch.nn.functional.softplus(z.float()) / neg_log_g
    return np.logaddexp(0.0, z) / neg_log_g


def remaining_from_value(u: Num, gamma: float) -> Num:
    """l̂ = ln(1-u) / ln γ for a σ-space value u in [0, 1); prefer remaining_from_logit."""
    log_g = math.log(check_gamma(gamma))
    if isinstance(u, (int, float)):
        if not 0.0 <= u < 1.0:
            raise ValueError(f"value must lie in [0, 1); got {u!r}")
        return math.log1p(-u) / log_g
    return _lib(u).log1p(-u) / log_g


def td_residual(u_prev: Num, u_next: Num, gamma: float) -> Num:
    """δ = γ·u_next - u_prev + (1-γ): 0 for exact progress, > 0 when the horizon grows (LENVM §6)."""
    g = check_gamma(gamma)
    return g * u_next - u_prev + (1.0 - g)


def gamma_from_lengths(lengths: Sequence[float] | np.ndarray, *, quantile: float = 0.99, mass: float = 0.99) -> float:
    """γ such that the `quantile` length gets a value of `mass`: γ = (1-mass)^(1/L_q)."""
    arr = np.asarray(lengths, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("gamma_from_lengths needs at least one length")
    if not np.all(np.isfinite(arr)) or np.any(arr < 1):
        raise ValueError("lengths must be finite and >= 1 (EOS counted)")
    if not 0.0 < quantile <= 1.0 or not 0.0 < mass < 1.0:
        raise ValueError(f"quantile must lie in (0, 1] and mass in (0, 1); got {quantile!r}, {mass!r}")
    l_q = float(np.quantile(arr, quantile))
    return float((1.0 - mass) ** (1.0 / l_q))

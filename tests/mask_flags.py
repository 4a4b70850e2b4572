"""EosRule masks as Python lists for assertions: None (no row, known on the host) reads as all False."""
from __future__ import annotations

import torch


def flags(mask: torch.Tensor | None, rows: int) -> list[bool]:
    return [False] * rows if mask is None else mask.tolist()

"""Markdown cells and tables of the results document: numbers, percentages, differences, escaped tables.

    num(0.1234, ".3f") -> "0.123"; num(None) -> NA        pct(0.25) -> "25.0%"
    delta([unguided, guided], "+.3f") -> "+0.100"         table(headers, rows) -> lines ending with ""
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

NA = "—"


def num(value: Any, fmt: str = ".1f", suffix: str = "") -> str:
    """A number in `fmt`, or NA for None / NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NA
    return f"{format(value, fmt)}{suffix}"


def pct(fraction: Any) -> str:
    return NA if fraction is None or math.isnan(fraction) else f"{100 * fraction:.1f}%"


def delta(pair: Sequence[Any], fmt: str, suffix: str = "") -> str:
    """second − first (guided − unguided), or NA when either is missing."""
    return NA if None in pair else num(pair[1] - pair[0], fmt, suffix)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table; a "|" inside a cell (|LD|, a token) is escaped so that it cannot split the cell."""
    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(headers), "|" + "---|" * len(headers), *map(line, rows), ""]

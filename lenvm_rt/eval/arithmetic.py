"""Simple one- and two-step arithmetic word problems in GSM8K format, for trade-off runs on small models.

    problems = make_problems(200, seed=0)     # [{"id", "question", "answer"}], answer ends with "#### n"
    write_problems(problems, "arith.jsonl")

Numbers stay small (operands 2–max_operand, default 20) and every answer is a non-negative integer, so a
small instruction model solves a useful share and the accuracy–length trade-off has real accuracy to
lose. Worked answers use GSM8K's "<<a+b=c>>" calculator annotations. The same seed gives the same file.
"""
from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

_NAMES = [("Tom", "He"), ("Anna", "She"), ("Ravi", "He"), ("Mia", "She"), ("Leo", "He"), ("Sara", "She"),
          ("Ken", "He"), ("Lina", "She"), ("Omar", "He"), ("Ella", "She")]
_ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells", "coins", "flowers"]

Problem = tuple[str, list[str], int]  # question, worked steps, answer


def _add(r: random.Random, name: str, he: str, item: str, hi: int) -> Problem:
    a, b = r.randint(2, hi), r.randint(2, hi)
    return (f"{name} has {a} {item}. {he} gets {b} more {item}. How many {item} does {name} have now?",
            [f"{name} has {a}+{b} = <<{a}+{b}={a + b}>>{a + b} {item}."], a + b)


def _sub(r: random.Random, name: str, he: str, item: str, hi: int) -> Problem:
    b = r.randint(2, hi)
    a = b + r.randint(1, hi)
    return (f"{name} had {a} {item} and gave {b} of them to a friend. How many {item} does {name} have left?",
            [f"{name} has {a}-{b} = <<{a}-{b}={a - b}>>{a - b} {item} left."], a - b)


def _mul(r: random.Random, name: str, he: str, item: str, hi: int) -> Problem:
    a, b = r.randint(2, min(hi, 12)), r.randint(2, min(hi, 12))
    return (f"{name} has {b} boxes with {a} {item} in each box. How many {item} does {name} have in total?",
            [f"{name} has {b}*{a} = <<{b}*{a}={a * b}>>{a * b} {item}."], a * b)


def _div(r: random.Random, name: str, he: str, item: str, hi: int) -> Problem:
    a, b = r.randint(2, min(hi, 12)), r.randint(2, min(hi, 9))
    return (f"{name} shares {a * b} {item} equally among {b} friends. How many {item} does each friend get?",
            [f"Each friend gets {a * b}/{b} = <<{a * b}/{b}={a}>>{a} {item}."], a)


def _add_mul(r: random.Random, name: str, he: str, item: str, hi: int) -> Problem:
    a, b, c = r.randint(2, hi), r.randint(2, min(hi, 9)), r.randint(2, min(hi, 9))
    return (f"{name} has {a} {item}. {he} buys {b} bags with {c} {item} in each bag. "
            f"How many {item} does {name} have now?",
            [f"The bags hold {b}*{c} = <<{b}*{c}={b * c}>>{b * c} {item}.",
             f"{name} has {a}+{b * c} = <<{a}+{b * c}={a + b * c}>>{a + b * c} {item} now."], a + b * c)


def _sub_add(r: random.Random, name: str, he: str, item: str, hi: int) -> Problem:
    b = r.randint(2, hi)
    a, c = b + r.randint(1, hi), r.randint(2, hi)
    return (f"{name} had {a} {item}. {he} gave away {b} {item} and then bought {c} more. "
            f"How many {item} does {name} have now?",
            [f"After giving some away, {name} has {a}-{b} = <<{a}-{b}={a - b}>>{a - b} {item}.",
             f"After buying more, {name} has {a - b}+{c} = <<{a - b}+{c}={a - b + c}>>{a - b + c} {item}."],
            a - b + c)


def _mul_sub(r: random.Random, name: str, he: str, item: str, hi: int) -> Problem:
    a, b = r.randint(2, min(hi, 9)), r.randint(2, min(hi, 9))
    c = r.randint(1, a * b - 1)
    return (f"{name} buys {a} packs of {item} with {b} {item} in each pack. {he} gives away {c} {item}. "
            f"How many {item} are left?",
            [f"{name} buys {a}*{b} = <<{a}*{b}={a * b}>>{a * b} {item}.",
             f"{a * b}-{c} = <<{a * b}-{c}={a * b - c}>>{a * b - c} {item} are left."], a * b - c)


def _add_double(r: random.Random, name: str, he: str, item: str, hi: int) -> Problem:
    a = r.randint(2, hi)
    return (f"{name} has {a} {item}. {name}'s sister has twice as many {item}. "
            f"How many {item} do they have together?",
            [f"The sister has 2*{a} = <<2*{a}={2 * a}>>{2 * a} {item}.",
             f"Together they have {a}+{2 * a} = <<{a}+{2 * a}={3 * a}>>{3 * a} {item}."], 3 * a)


ONE_STEP: list[Callable[..., Problem]] = [_add, _sub, _mul, _div]
TWO_STEP: list[Callable[..., Problem]] = [_add_mul, _sub_add, _mul_sub, _add_double]


def make_problems(n: int, *, seed: int = 0, two_step_share: float = 0.5, max_operand: int = 20
                  ) -> list[dict[str, Any]]:
    """n problems {"id", "question", "answer"}; about two_step_share of them need two operations.

    Operands lie in [2, max_operand] (factors of a product at most 9 or 12; a minuend may reach 2·max_operand).
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int; got {n!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int; got {seed!r}")
    if not 0.0 <= two_step_share <= 1.0:
        raise ValueError(f"two_step_share must lie in [0, 1]; got {two_step_share!r}")
    if not isinstance(max_operand, int) or isinstance(max_operand, bool) or max_operand < 2:
        raise ValueError(f"max_operand must be an int >= 2; got {max_operand!r}")
    r = random.Random(seed)
    out = []
    for i in range(n):
        kinds = TWO_STEP if r.random() < two_step_share else ONE_STEP
        name, he = r.choice(_NAMES)
        question, steps, answer = r.choice(kinds)(r, name, he, r.choice(_ITEMS), max_operand)
        out.append({"id": f"arith-{i}", "question": question, "answer": "\n".join(steps) + f"\n#### {answer}"})
    return out


def write_problems(problems: list[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write problems as JSONL (one object a line), creating the parent directory."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        for p in problems:
            fh.write(json.dumps(p, ensure_ascii=False) + "\n")
    return out

"""Final answers of math word problems: the gold answer of a GSM8K row and the answer in a model's text.

    gold_answer("... #### 1,234") -> "1234"       text after the last "#### ", commas removed (GSM8K official)
    extract_answer(text) -> str | None             content of the last \\boxed{...} (nested braces kept), else
                                                   the last number in the text; None when there is neither
    answers_match(predicted, gold) -> bool         numeric comparison after normalize_number; text equality
                                                   (whitespace and case folded) when either side is no number
    normalize_number("$1,234.0") -> 1234.0         drops $, \\$, commas, thin spaces, a trailing ".", a leading
                                                   "+"; reads a plain fraction a/b or \\frac{a}{b}; None otherwise

Convention (name it in every report, LENVM.md §7.2): "last \\boxed{} else last number, numeric match".
The reference's trade-off uses math_verify with the boxed answer as fallback; for GSM8K, whose answers
are plain numbers, both agree on every answer that is a number.
"""
from __future__ import annotations

import re

CONVENTION = "last \\boxed{} content, else the last number in the text; numeric match (commas, $, trailing .0 ignored)"
_NUMBER = re.compile(r"[-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-−]?\.\d+")
_FRAC = re.compile(r"^\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")
_ANNOTATION = re.compile(r"<<[^<>]*>>")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def gold_answer(answer: str | int | float) -> str:
    """The reference answer of a GSM8K "answer" field: the text after the last "#### ", commas removed.

    A bare number (or numeric text) is accepted as is. ValueError when there is no final answer.
    """
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(f"'answer' must be text or a number; got {type(answer).__name__}")
    if not isinstance(answer, str):
        return repr(answer) if isinstance(answer, float) else str(answer)
    if "####" in answer:
        final = answer.rsplit("####", 1)[1].strip().replace(",", "")
        if not final:
            raise ValueError("'answer' has nothing after '####'")
        return final
    text = _ANNOTATION.sub("", answer).strip()
    if normalize_number(text) is None:
        raise ValueError("'answer' has no '#### ' final answer and is not a number")
    return text.replace(",", "")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), with nested braces; None when there is none."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth = 0
        for i in range(match.end() - 1, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[match.end():i].strip()
    return None  # none, or only unclosed ones (a cut response)


def last_number(text: str) -> str | None:
    """The last number in the text (thousands separators allowed), commas removed; None when there is none."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "").replace("−", "-") if found else None


def extract_answer(text: str) -> str | None:
    """The model's final answer: the last \\boxed{} content, else the last number in the text."""
    boxed = last_boxed(text)
    if boxed is not None and boxed:
        return boxed
    return last_number(text)


def normalize_number(text: str) -> float | None:
    """The number a short answer states ("$1,234", "18.0", "-3", "\\frac{1}{2}", "7 apples"), or None."""
    s = text.strip()
    for junk in ("\\$", "$", "\\!", "\\,", "\\;", "\u2009", "\\%", "%", "{,}"):
        s = s.replace(junk, "")
    s = re.sub(r"\\(?:text|mathrm|textbf|mbox)\{[^{}]*\}", "", s)
    s = s.replace("−", "-").replace(",", "").strip().rstrip(".").strip()
    if s.startswith("+"):
        s = s[1:]
    frac = _FRAC.match(s)
    if frac:
        s = f"{frac.group(1)}/{frac.group(2)}"
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            return float(num) / float(den)
        return float(s)
    except (ValueError, ZeroDivisionError):
        pass
    found = _NUMBER.findall(s)  # "7 apples", "x = 5": a single number inside words
    if len(found) == 1:
        return float(found[0].replace(",", "").replace("−", "-"))
    return None


def answers_match(predicted: str | None, gold: str) -> bool:
    """True when the predicted answer states the gold answer (numbers compared with a relative 1e-6)."""
    if predicted is None:
        return False
    p, g = normalize_number(predicted), normalize_number(gold)
    if p is not None and g is not None:
        return abs(p - g) <= 1e-6 * max(1.0, abs(g))
    return " ".join(predicted.split()).casefold() == " ".join(gold.split()).casefold()

"""`lenvm_rt/_core.pyi` (hand-written) agrees with the built pybind11 module `lenvm_rt._core`.

Both ways: every public function, class and method of the module is in the stub and vice versa, with the
same parameter names in the same order (the module's names come from the pybind11 signature lines in
`__doc__`, which carry the `py::arg` names).
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

from lenvm_rt import _core

STUB = Path(__file__).resolve().parents[1] / "lenvm_rt" / "_core.pyi"
Signatures = dict[str, list[str]]


def _stub_signatures(body: list[ast.stmt], prefix: str = "") -> Signatures:
    found: Signatures = {}
    for node in body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            args = node.args
            found[prefix + node.name] = [a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]]
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            found[prefix + node.name] = []
            found.update(_stub_signatures(node.body, f"{prefix}{node.name}."))
    return found


def _split_top_level(params: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in params:
        depth += (ch in "[(") - (ch in "])")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [p.strip() for p in [*parts, current] if p.strip()]


def _doc_parameters(name: str, doc: str) -> list[str]:
    match = re.search(rf"^(?:\d+\. )?{re.escape(name)}\((.*)\) ->", doc, re.MULTILINE)
    assert match, f"no pybind11 signature for {name!r} in its __doc__: {doc!r}"
    return [re.split(r"[:=]", p, maxsplit=1)[0].strip() for p in _split_top_level(match.group(1))]


def _module_signatures(namespace: object, prefix: str = "") -> Signatures:
    found: Signatures = {}
    for name, value in vars(namespace).items():
        if name.startswith("_"):
            continue
        if inspect.isclass(value):
            found[prefix + name] = []
            found.update(_module_signatures(value, f"{prefix}{name}."))
        elif callable(value):
            found[prefix + name] = _doc_parameters(name, value.__doc__ or "")
    return found


def test_stub_matches_module_both_ways() -> None:
    stub = _stub_signatures(ast.parse(STUB.read_text()).body)
    built = _module_signatures(_core)
    assert built, "the built module exports nothing"
    assert sorted(stub) == sorted(built)
    assert stub == built

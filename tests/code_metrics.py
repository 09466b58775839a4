"""Measures of the code's shape, read from the source with ``ast`` (nothing is imported).

* ``long_functions``: functions with more than ``limit`` lines of code (blank lines,
  comment lines and the docstring not counted; a nested function counts in its outer one).
* ``nn_methods``: the public methods of the layer classes in ``fbp/nn``, and whether each
  has a type hint on every argument and on its return.
* ``array_docstrings``: the public functions and methods that take an array and have a
  docstring, and whether the docstring gives a shape.
* ``inner_imports``: ``import`` statements inside a function.

Run ``python tests/code_metrics.py`` from the repository root for a report;
tests/test_code_shape.py holds the limits.
"""

from __future__ import annotations

import ast
import io
import re
import sys
import tokenize
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fbp"

# Argument names that carry arrays in fbp's signatures (see the house style's names).
ARRAY_NAMES = {
    "x", "y", "dy", "dx", "dpred", "pred", "target", "labels", "logits", "lengths",
    "h", "c", "h0", "c0", "q", "k", "v", "dout", "mask", "inputs", "targets", "images",
    "tokens", "scores", "probs", "positions", "features",
}  # fmt: skip
SHAPE_RE = re.compile(r"shape|\(\.\.\.|\((batch|time|B|T|N|n|b)\b|\(\w+, [\w.]+")


def modules(root: Path = PACKAGE) -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(root.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def _code_lines(source: str) -> set[int]:
    """Line numbers holding a token other than comments, newlines and string statements."""
    lines: set[int] = set()
    toks = tokenize.generate_tokens(io.StringIO(source).readline)
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}
    for tok in toks:
        if tok.type not in skip:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return lines


def _docstring_lines(tree: ast.Module) -> set[int]:
    out: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                if isinstance(first.value.value, str):
                    out.update(range(first.lineno, first.end_lineno + 1))
    return out


def _functions(tree: ast.AST, outer: bool = True) -> Iterator[ast.FunctionDef]:
    """Functions not nested in another function (methods included)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node)


def long_functions(limit: int = 60) -> list[tuple[str, str, int]]:
    """``(file, function, code lines)`` for each function over ``limit`` lines of code."""
    out = []
    for path, tree in modules():
        code = _code_lines(path.read_text()) - _docstring_lines(tree)
        for fn in _functions(tree):
            n = len([i for i in range(fn.lineno, fn.end_lineno + 1) if i in code])
            if n > limit:
                out.append((str(path.relative_to(ROOT)), fn.name, n))
    return out


def _annotated(fn: ast.FunctionDef) -> bool:
    a = fn.args
    args = [*a.posonlyargs, *a.args, *a.kwonlyargs]
    args = [x for x in args if x.arg not in ("self", "cls")]
    args += [x for x in (a.vararg, a.kwarg) if x is not None]
    return fn.returns is not None and all(x.annotation is not None for x in args)


def nn_methods() -> list[tuple[str, str, bool]]:
    """``(class, method, annotated)`` for each public method of a class in fbp/nn."""
    out = []
    for path, tree in modules(PACKAGE / "nn"):
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            if cls.name.startswith("_"):
                continue
            for fn in cls.body:
                if isinstance(fn, ast.FunctionDef) and not fn.name.startswith("_"):
                    out.append((f"{path.stem}.{cls.name}", fn.name, _annotated(fn)))
    return out


def _takes_array(fn: ast.FunctionDef) -> bool:
    a = fn.args
    for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs]:
        ann = ast.unparse(arg.annotation) if arg.annotation is not None else ""
        if arg.arg in ARRAY_NAMES or "Array" in ann:
            return True
    return False


def _public(path: Path) -> bool:
    return not any(p.startswith("_") and p != "__init__.py" for p in path.parts[-2:])


def array_docstrings() -> list[tuple[str, bool]]:
    """``(name, gives a shape)`` for each public documented function taking an array."""
    out = []
    for path, tree in modules():
        if not _public(path.relative_to(ROOT)):
            continue
        scopes: list[tuple[str, ast.AST]] = [(path.stem, tree)]
        scopes += [
            (f"{path.stem}.{c.name}", c)
            for c in tree.body
            if isinstance(c, ast.ClassDef) and not c.name.startswith("_")
        ]
        for prefix, scope in scopes:
            for fn in getattr(scope, "body", []):
                if not isinstance(fn, ast.FunctionDef) or fn.name.startswith("_"):
                    continue
                doc = ast.get_docstring(fn)
                if doc and _takes_array(fn):
                    out.append((f"{prefix}.{fn.name}", bool(SHAPE_RE.search(doc))))
    return out


def inner_imports() -> list[tuple[str, str, int, str]]:
    """``(file, function, line, statement)`` for each import inside a function."""
    out = []
    for path, tree in modules():
        for fn in _functions(tree):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    rel = str(path.relative_to(ROOT))
                    out.append((rel, fn.name, node.lineno, ast.unparse(node)))
    return out


def main() -> int:
    methods = nn_methods()
    done = sum(a for *_, a in methods)
    print(f"nn layer methods annotated: {done} of {len(methods)}")
    docs = array_docstrings()
    shaped = sum(s for _, s in docs)
    print(f"public docstrings taking arrays with shapes: {shaped} of {len(docs)}"
          f" ({100 * shaped / max(len(docs), 1):.0f}%)")  # fmt: skip
    for name, s in docs:
        if not s:
            print(f"  no shape: {name}")
    long = long_functions()
    print(f"functions over 60 lines of code: {len(long)}")
    for f, name, n in long:
        print(f"  {f}:{name} {n}")
    imports = inner_imports()
    print(f"in-function imports: {len(imports)}")
    for f, name, line, stmt in imports:
        print(f"  {f}:{line} {name}: {stmt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

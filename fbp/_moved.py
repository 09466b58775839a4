"""Old import paths of modules that moved in fbp 0.2, kept for one release.

``import fbp.runner`` (or ``fbp.sweep.grid``, ``fbp.parallel``...) still works and
returns the module at its new path, with a ``DeprecationWarning`` naming it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

_RUN: tuple[str, ...] = (
    "cli",
    "experiment",
    "export",
    "loop",
    "options",
    "privacy",
    "report",
    "runner",
)
_RUN += ("schedules", "sweep", "variants")
MOVED = {f"fbp.{m}": f"fbp.run.{m}" for m in _RUN}
MOVED |= {f"fbp.{m}": f"fbp.distributed.{m}" for m in ("cluster", "layout", "parallel")}


def new_name(name: str) -> str | None:
    """The new path of an old module path (``fbp.sweep.grid`` -> ``fbp.run.sweep.grid``)."""
    for old, new in MOVED.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    return None


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} moved to {self.new}; the old path goes away in fbp 0.3.",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:
        del module  # already executed under its new name


class MovedFinder(importlib.abc.MetaPathFinder):
    """Finds the old paths of moved modules (installed by ``fbp/__init__.py``)."""

    def find_spec(self, name, path=None, target=None):  # noqa: D102
        del path, target
        new = new_name(name)
        if new is None:
            return None
        return importlib.util.spec_from_loader(name, _Alias(new))


def install() -> None:
    """Put ``MovedFinder`` on ``sys.meta_path`` once."""
    if not any(isinstance(f, MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedFinder())  # before the path finder: no second copy

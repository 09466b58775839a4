"""Old module paths (before fbp.run / fbp.distributed) still import, with a warning."""

import importlib
import sys
import warnings

import pytest

import fbp
from fbp import _moved


@pytest.mark.parametrize(
    "old,new",
    [
        ("fbp.runner", "fbp.run.runner"),
        ("fbp.experiment", "fbp.run.experiment"),
        ("fbp.sweep.grid", "fbp.run.sweep.grid"),
        ("fbp.cluster", "fbp.distributed.cluster"),
    ],
)
def test_an_old_module_path_is_the_moved_module_with_a_deprecation_warning(old, new, monkeypatch):
    for name in [m for m in sys.modules if m == old or m.startswith("fbp.sweep")]:
        monkeypatch.delitem(sys.modules, name)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    messages = [str(w.message) for w in seen if w.category is DeprecationWarning]
    assert f"{old} moved to {new}; the old path goes away in fbp 0.3." in messages


def test_the_package_attribute_fbp_parallel_is_the_distributed_module():
    from fbp.distributed import parallel

    assert fbp.parallel is parallel


def test_paths_that_did_not_move_are_not_aliased():
    assert _moved.new_name("fbp.train") is None
    assert _moved.new_name("fbp.runs") is None
    assert _moved.new_name("fbp.run.runner") is None

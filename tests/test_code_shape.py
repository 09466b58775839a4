"""The code's shape, measured from the source by tests/code_metrics.py."""

import code_metrics


def test_every_nn_layer_method_has_type_hints():
    missing = [f"{c}.{m}" for c, m, annotated in code_metrics.nn_methods() if not annotated]
    assert not missing, f"nn layer methods without full type hints: {missing}"


def test_every_public_docstring_taking_arrays_gives_shapes():
    missing = [name for name, shaped in code_metrics.array_docstrings() if not shaped]
    assert not missing, f"public docstrings taking arrays without a shape: {missing}"


def test_py_typed_ships_with_the_package():
    assert (code_metrics.PACKAGE / "py.typed").is_file()
    pyproject = (code_metrics.ROOT / "pyproject.toml").read_text()
    assert '[tool.setuptools.package-data]\nfbp = ["py.typed"]' in pyproject

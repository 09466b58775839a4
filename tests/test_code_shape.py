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


def test_no_function_is_over_60_lines_of_code():
    assert code_metrics.long_functions(60) == []


# What a function may import inside itself: heavy modules needed by one feature only
# (scikit-learn, matplotlib), an optional dependency (dp-accounting), jax's private
# backend state (with a fallback), and fbp.run from the library (xla_config's one look).
DEFERRED = ("sklearn", "matplotlib", "dp_accounting", "jax._src", "fbp.run")


def test_in_function_imports_only_defer_heavy_or_optional_modules():
    def module(stmt):
        return stmt.split()[1]

    bad = [i for i in code_metrics.inner_imports() if not module(i[3]).startswith(DEFERRED)]
    assert not bad, f"imports inside functions: {bad}"

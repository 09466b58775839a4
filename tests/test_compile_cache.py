"""The persistent compilation cache: location, switches, rejected entries, processes."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from fbp import compile_cache


@pytest.fixture
def restore_jax_cache():
    yield
    compile_cache.disable_compilation_cache()
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_enable_compilation_cache", True)


def test_default_dir_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_cache_dir() == tmp_path / "fbp" / "xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache.default_cache_dir() == Path.home() / ".cache" / "fbp" / "xla"


@pytest.mark.parametrize("value", ["0", "off", "False"])
def test_env_var_switches_it_off(monkeypatch, tmp_path, value):
    monkeypatch.setenv("FBP_COMPILATION_CACHE", value)
    assert compile_cache.enable_compilation_cache(tmp_path / "c") is None
    assert not (tmp_path / "c").exists()
    assert compile_cache.enable_compilation_cache(tmp_path / "c", enabled=False) is None


def test_bad_max_bytes_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"max_bytes must be a positive int, got 0"):
        compile_cache.enable_compilation_cache(tmp_path, max_bytes=0)


def test_enabled_cache_writes_entries_and_hits(tmp_path, monkeypatch, restore_jax_cache):
    monkeypatch.delenv("FBP_COMPILATION_CACHE", raising=False)
    path = compile_cache.enable_compilation_cache(tmp_path / "xla")
    assert path == tmp_path / "xla"
    jax.jit(lambda v: jnp.cos(v) + 2.0)(jnp.ones(4)).block_until_ready()
    assert len([p for p in path.iterdir() if not p.name.startswith(".")]) >= 2


def test_rejected_entries_warn_once_and_carry_on(tmp_path, monkeypatch, restore_jax_cache):
    monkeypatch.delenv("FBP_COMPILATION_CACHE", raising=False)
    monkeypatch.setattr(compile_cache, "_probe_hits", lambda: False)  # as on jax#38445 CPUs
    with pytest.warns(RuntimeWarning, match=r"could not be read back .* compiling without it"):
        assert compile_cache.enable_compilation_cache(tmp_path) is None
    assert not jax.config.jax_enable_compilation_cache
    assert float(jax.jit(lambda v: v * 2.0)(jnp.ones(()))) == 2.0


_SCRIPT = """
import sys, jax, jax.numpy as jnp
from fbp import compile_cache
assert compile_cache.enable_compilation_cache(sys.argv[1]) is not None
print(float(jax.jit(lambda v: jnp.tanh(v).sum())(jnp.ones(8))))
"""


def test_two_processes_share_one_cache(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FBP_COMPILATION_CACHE"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    cmd = [sys.executable, "-c", _SCRIPT, str(tmp_path / "shared")]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert all(abs(float(o) - 8 * 0.7615941) < 1e-4 for o in outs)

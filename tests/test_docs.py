"""Every ```python block of README.md and docs/*.md runs as written.

Each Markdown file's blocks run in order, in one fresh namespace, in a fresh Python
process (as a reader's script would: float32, no test configuration, warnings as
errors, so a deprecated import path fails) inside an empty directory. A block that
cannot run in seconds is preceded by a ``<!-- no-run: why -->`` comment, which this
test requires to give its reason.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# The README and the getting-started page run by default; the other pages (a minute and
# a half of fresh processes together) with -m slow, which CI runs as a second command.
DEFAULT_PAGES = ("README.md", "getting-started.md")
BLOCK = re.compile(r"(?P<before>[^\n]*)\n*```python\n(?P<code>.*?)```", re.S)
NO_RUN = re.compile(r"<!-- no-run: (?P<why>\S.*) -->")

# Runs in the child process: execs each block of one file in a shared namespace and
# names the block that failed (file and line) in the traceback.
DRIVER = """
import json, sys
blocks = json.load(sys.stdin)
namespace = {"__name__": "__main__"}
for path, line, code in blocks:
    exec(compile("\\n" * (line - 1) + code, path, "exec"), namespace)
"""


def python_blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """The ```python blocks of a Markdown file.

    Args:
        path: a Markdown file.

    Returns:
        (line of the block's first code line, code, reason it is not run or None), in order.
    """
    text = path.read_text()
    blocks = []
    for m in BLOCK.finditer(text):
        line = text.count("\n", 0, m.start("code")) + 1
        skip = NO_RUN.search(m.group("before"))
        blocks.append((line, m.group("code"), skip.group("why") if skip else None))
    return blocks


def test_the_collector_finds_blocks_and_no_run_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n```python\nx = 1\n```\n\n<!-- no-run: trains for minutes -->\n"
        "```python\ny = 2\n```\n\n```bash\nls\n```\n"
    )
    assert python_blocks(page) == [(4, "x = 1\n", None), (9, "y = 2\n", "trains for minutes")]


def runnable_blocks(page: Path) -> list[tuple[str, int, str]]:
    """(file, line, code) of each block of ``page`` that runs (no ``no-run`` marker)."""
    return [(str(page), line, code) for line, code, why in python_blocks(page) if why is None]


@pytest.mark.parametrize(
    "page",
    [
        pytest.param(p, marks=() if p.name in DEFAULT_PAGES else pytest.mark.slow)
        for p in PAGES
        if runnable_blocks(p)  # pages without code (the results, the index) have no test
    ],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_every_python_block_of_the_page_runs(page, tmp_path):
    blocks = runnable_blocks(page)

    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", DRIVER],
        input=json.dumps(blocks),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

"""Every ```python block of README.md runs as written (on the embedded tiny model and data), unless its first line
is ``# signature`` (an API summary, not a program)."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks():
    with open(README) as f:
        text = f.read()
    blocks = []
    for m in re.finditer(r"```python\n(.*?)```", text, flags=re.S):
        line = text.count("\n", 0, m.start()) + 1
        blocks.append((line, m.group(1)))
    return blocks


BLOCKS = python_blocks()
RUNNABLE = [(line, code) for line, code in BLOCKS if not code.lstrip().startswith("# signature")]


def test_every_block_is_runnable_or_marked():
    assert len(BLOCKS) >= 5 and len(RUNNABLE) >= 3
    for line, code in BLOCKS:
        first = code.strip().splitlines()[0]
        assert first == "# signature" or not first.startswith("# sig"), f"README.md:{line}: malformed marker"


@pytest.mark.parametrize("line, code", RUNNABLE, ids=[f"README.md:{line}" for line, _ in RUNNABLE])
def test_readme_block_runs(line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples write runs/... relative to the working directory
    import torch
    torch.manual_seed(0)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})  # noqa: S102

"""The examples of docs/integrations.md run as written and print what the text says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import hnswcache

DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
EXPECTED = [
    ("hnswcache.compat", []),
    ("langchain_core", ["Paris.", "Paris.", "1"]),
    ("gptcache", ["Paris", "None"]),
]


@pytest.mark.parametrize("number", range(len(EXPECTED)))
def test_example_runs(number: int, tmp_path: Path) -> None:
    needs, printed = EXPECTED[number]
    pytest.importorskip(needs)
    if needs == "gptcache":
        pytest.importorskip("sqlalchemy")
    assert len(BLOCKS) == len(EXPECTED)
    script = tmp_path / "example.py"
    script.write_text(BLOCKS[number])
    # run where the tests import hnswcache from (an installed wheel or the source tree)
    path = [str(Path(hnswcache.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
        timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == printed

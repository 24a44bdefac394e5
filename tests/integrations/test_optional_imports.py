"""Integrations are extras: importing hnswcache (or its hnswlib face) imports none of them."""

from __future__ import annotations

import subprocess
import sys

import hnswcache


def test_importing_hnswcache_imports_no_integration() -> None:
    code = (
        "import sys, hnswcache, hnswcache.compat.hnswlib, hnswcache.integrations\n"
        "bad = [m for m in ('gptcache', 'langchain_core', 'langchain_tests', 'hnswlib',"
        " 'sqlalchemy') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
    assert hnswcache.Index is not None

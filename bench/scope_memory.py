"""Memory of a cache's replica when every entry has its own scope, as chat traffic does
(``chat_key`` and the LangChain cache put each conversation in its own scope), against the
same entries in one scope.

    python bench/scope_memory.py [--n 20000]

Each scope has its own index: what one index of one entry costs is the figure that matters.
Prints the resident-memory growth (Linux ``/proc/self/statm``) and the time to fill.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from hnswcache import SemanticCache
from hnswcache.embed import HashEmbedder


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def fill(n: int, scoped: bool) -> tuple[float, float, int]:
    cache = SemanticCache(HashEmbedder(384), store="memory")
    base, t = rss_mb(), time.perf_counter()
    for i in range(n):
        cache.set(f"question {i} about thing {i % 97}", f"answer {i}",
                  scope={"chat": f"{i:032x}"} if scoped else None)
    out = (rss_mb() - base, time.perf_counter() - t, len(cache._core.indexes))
    cache.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--one", choices=("scoped", "single"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    n = args.n
    if args.one is None:  # each fill in a fresh process: memory freed by one is not reused
        for kind in ("scoped", "single"):
            subprocess.run([sys.executable, __file__, "--n", str(n), "--one", kind], check=True)
        return
    mb, secs, scopes = fill(n, args.one == "scoped")
    print(f"{n} entries in {scopes} scope(s): +{mb:.0f} MB resident "
          f"({mb * 2**20 / n / 1024:.1f} KiB an entry), filled in {secs:.1f} s")


if __name__ == "__main__":
    main()

"""How far above ``max_entries`` does a store go while many writers write at once?

    python bench/evict_peak.py [--processes 3] [--threads 24] [--writes 40] [--cap 100]

Starts a private valkey-server (the ``server`` extra), then ``--processes`` processes of
``--threads`` threads, each thread writing ``--writes`` new entries through its process's
:class:`~hnswcache.SemanticCache` (``max_entries=--cap``, a hash embedder: no model). A
sampler reads the namespace's LRU count every millisecond. Prints the peak, the count once
the writes stop, the entry keys left and each process's store errors. Each write evicts
after itself, so the store is above the cap while writes are in flight; the peak says by
how much.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time

import redis

from hnswcache.store.redis import keys_for
from hnswcache.store.server import EmbeddedServer

CHILD = r"""
import sys, threading
from hnswcache import SemanticCache
from hnswcache.embed import HashEmbedder
url, ns, tag, threads, writes, cap = sys.argv[1:7]
cache = SemanticCache(HashEmbedder(32), store=url, namespace=ns, max_entries=int(cap))
def write(t):
    for i in range(int(writes)):
        cache.set(f"{tag} thread {t} question {i}", "an answer")
ths = [threading.Thread(target=write, args=(t,)) for t in range(int(threads))]
for th in ths:
    th.start()
for th in ths:
    th.join()
print(cache.stats()["store_errors"])
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=3)
    ap.add_argument("--threads", type=int, default=24)
    ap.add_argument("--writes", type=int, default=40, help="per thread")
    ap.add_argument("--cap", type=int, default=100, help="max_entries")
    args = ap.parse_args()
    server = EmbeddedServer(tempfile.mkdtemp(prefix="hc-evict-")).start()
    try:
        r = redis.Redis.from_url(server.url)
        ns = f"evict{int(time.time())}"
        k = keys_for(ns)
        peak, stop = [0], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], int(r.zcard(k["lru"])))
                time.sleep(0.001)

        sampler = threading.Thread(target=sample)
        sampler.start()
        procs = [subprocess.Popen(  # (they import hnswcache as this process does: PYTHONPATH)
            [sys.executable, "-c", CHILD,
             server.url, ns, f"p{p}", str(args.threads), str(args.writes), str(args.cap)],
            stdout=subprocess.PIPE) for p in range(args.processes)]
        errors = [int(p.communicate()[0].decode().strip() or -1) for p in procs]
        stop.set()
        sampler.join()
        print(json.dumps({
            "processes": args.processes, "threads": args.threads, "writes": args.writes,
            "cap": args.cap, "peak": peak[0], "after": int(r.zcard(k["lru"])),
            "entries": len(list(r.scan_iter(k["entry"] + "*"))), "store_errors": errors}))
    finally:
        server.stop()


if __name__ == "__main__":
    main()

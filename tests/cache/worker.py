"""A second process for the cache tests (run as a script; never imported by pytest).

    worker.py writer URL NS COUNT     set "shared prompt i" -> "answer i" (strict), print
                                      "ack i" after each acknowledged write; COUNT < 0: forever
    worker.py reader URL NS PROMPT T  get PROMPT until it hits (or T seconds pass); print
                                      "hit RESPONSE SECONDS" or "timeout", and "entries N"

    worker.py llm URL NS PROMPT SECONDS WAIT LOG
                                      print "ready", read a line, then call a @cached(wait=WAIT)
                                      "LLM" that appends this pid to LOG and takes SECONDS;
                                      print "answer A" and "coalesced N"

    worker.py owner DIR NS COUNT MODE   start the embedded server (data in DIR) from the
                                      main thread (MODE "main") or from a thread that then
                                      exits (MODE "thread"), set COUNT entries (strict), print
                                      "server PID", then sleep until killed

A URL ``cluster+redis://host:port/0`` connects with redis-py's ``RedisCluster``.
"""

from __future__ import annotations

import sys
import time

from hnswcache import SemanticCache
from hnswcache.embed import HashEmbedder


def owner(data_dir: str, ns: str, count: int, mode: str) -> None:
    import threading

    made: list[SemanticCache] = []

    def make() -> None:
        made.append(SemanticCache(HashEmbedder(64), data_dir=data_dir, namespace=ns,
                                  strict=True, timeout=5.0))

    if mode == "thread":
        t = threading.Thread(target=make)
        t.start()
        t.join()  # the thread that asked for the server is gone
    else:
        make()
    cache = made[0]
    for i in range(count):
        cache.set(f"owned prompt {i}", f"answer {i}")
    print(f"server {cache._server.pid}", flush=True)
    while True:
        time.sleep(60)


def llm(url: str, ns: str, prompt: str, seconds: float, wait: float, log: str) -> None:
    import os

    cache = SemanticCache(HashEmbedder(64), store=url, namespace=ns, timeout=5.0)

    @cache.cached(wait=wait)
    def ask(p: str) -> str:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(seconds)
        return f"answer from {os.getpid()}"

    print("ready", flush=True)
    sys.stdin.readline()
    answer = ask(prompt)
    print(f"answer {answer}")
    print(f"coalesced {cache.stats()['coalesced']}", flush=True)


def main() -> None:
    if sys.argv[1] == "owner":
        owner(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
        return
    if sys.argv[1] == "llm":
        llm(*sys.argv[2:5], float(sys.argv[5]), float(sys.argv[6]), sys.argv[7])
        return
    mode, url, ns = sys.argv[1:4]
    store: object = url
    if url.startswith("cluster+"):
        from redis.cluster import RedisCluster

        store = RedisCluster.from_url(url[len("cluster+"):], socket_timeout=5.0)
    cache = SemanticCache(HashEmbedder(64), store=store, namespace=ns, threshold=0.5,
                          strict=(mode == "writer"), timeout=2.0)
    if mode == "writer":
        count = int(sys.argv[4])
        i = 0
        while count < 0 or i < count:
            cache.set(f"shared prompt {i}", f"answer {i}")
            sys.stdout.write(f"ack {i}\n")
            sys.stdout.flush()
            i += 1
        return
    prompt, limit = sys.argv[4], float(sys.argv[5])
    t0 = time.monotonic()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while time.monotonic() - t0 < limit:
        hit = cache.get(prompt)
        if hit is not None:
            print(f"hit {hit.response} {time.monotonic() - t0:.4f}")
            break
        time.sleep(0.002)
    else:
        print("timeout")
    print(f"entries {len(cache)}")


if __name__ == "__main__":
    main()

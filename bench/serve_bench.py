"""Latency of `--step serve` by route and concurrency: a real server process on a free port, fed by
1, 4 and 16 client threads, escalating to the loopback stand-in teacher (127.0.0.1, SIMULATED, no
network; --teacher_ms per answer).

    uv run python bench/serve_bench.py --root cifar5_run            # a run after --step export
    uv run python bench/serve_bench.py --root cifar5_run --requests 400 --teacher_ms 300

Clients keep their connections alive. Uploads are the run's own test images (as raw files), each sent with one random pixel changed so no two
are byte-identical (the LLM route would otherwise answer from the ledger). Prints req/s and p50 / p99
latency (ms, measured at the client) per route and per client count. The run folder is copied first;
the original is not touched.
"""
import argparse
import io
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from flywheel.io import read_csv  # noqa: E402
from loopback import LoopbackTeacher  # noqa: E402
from test_serve import Server  # noqa: E402


def uploads(run, n, seed=0):
    rng = np.random.default_rng(seed)
    rows = [r for r in read_csv(run / "manifest.csv") if r["split"] == "test"]
    out = []
    for i in range(n):
        with Image.open(run / rows[i % len(rows)]["path"]) as im:
            a = np.asarray(im.convert("RGB")).copy()
        a[rng.integers(a.shape[0]), rng.integers(a.shape[1])] = rng.integers(0, 256, 3)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def pct(xs, q):
    return float(np.percentile(xs, q)) if xs else float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="a run folder after --step export (default: none, required)")
    p.add_argument("--requests", type=int, default=200, help="requests per client count (default: 200)")
    p.add_argument("--teacher_ms", type=float, default=0.0, help="stand-in teacher latency per answer, ms (default: 0)")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    run = tmp / "run"
    shutil.copytree(a.root, run)
    classes = [c for c in __import__("json").loads((run / "classes.json").read_text())]
    try:
        with LoopbackTeacher(classes=classes, latency_s=a.teacher_ms / 1000) as teacher:
            srv = Server(run, teacher.url)
            try:
                for data in uploads(run, 5, seed=99):  # warm-up: sessions, connections
                    srv.classify(data)
                print(f"serve bench: {a.requests} requests per row; SIMULATED loopback teacher at {a.teacher_ms:g} ms; "
                      f"latency at the client, ms")
                print(f"{'clients':>8}{'req/s':>9}  {'route':<8}{'n':>6}{'p50':>9}{'p99':>9}")
                for clients in (1, 4, 16):
                    data = uploads(run, a.requests, seed=clients)
                    # one keep-alive client, as a real caller would hold: a new client per request costs ~30 ms
                    client = httpx.Client(limits=httpx.Limits(max_connections=clients), timeout=60)

                    def one(d):
                        t0 = time.perf_counter()
                        r = client.post(srv.url + "/v1/classify", files={"file": ("x.png", d, "image/png")})
                        return r.json()["route"], 1000 * (time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    with ThreadPoolExecutor(clients) as ex:
                        res = list(ex.map(one, data))
                    rps = len(res) / (time.perf_counter() - t0)
                    client.close()
                    for route in ("student", "llm", "human"):
                        ms = [m for r, m in res if r == route]
                        if ms:
                            print(f"{clients:>8}{rps:>9.1f}  {route:<8}{len(ms):>6}{statistics.median(ms):>9.2f}{pct(ms, 99):>9.2f}")
            finally:
                srv.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Latency of `--step serve` by route and concurrency: a real server process on a free port, fed by
client threads, escalating to the loopback stand-in teacher (127.0.0.1, SIMULATED, no network).

    uv run python bench/serve_bench.py --root cifar5_run            # a run after --step export
    uv run python bench/serve_bench.py --root cifar5_run --teacher_ms 0 --faults off --keepalive
    uv run python bench/serve_bench.py --root cifar5_run --with_turn  # 4 clients, a flywheel turn alongside

By default the stand-in answers in --teacher_ms 300 with realistic faults (SIMULATED: 5% 429 with
Retry-After 1 s, 2% 503, 0.5% hanging 5 s), without TCP_NODELAY (as Python's http.server and some proxies),
and 16 client threads open a new connection per request. Uploads are the run's own test images (as raw
files), each with one random pixel changed so no two are byte-identical (the LLM route would otherwise
answer from the ledger). Prints req/s and p50 / p99 latency (ms, measured at the client) per route and per
client count. With --with_turn, the server and a `--step flywheel` turn on the same run folder each get one
core (taskset and --num_threads 1), and the student route is timed at 4 clients with and without the turn.
The run folder is copied first; the original is not touched.
"""
import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
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
from fakes import KEY  # noqa: E402
from loopback import Faults, LoopbackTeacher  # noqa: E402
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


def load(srv, data, clients, keepalive):
    """Each upload once, from `clients` threads -> ([(route, ms)], req/s)."""
    # without keep-alive, a new TCP connection per request, as the clients in issue 26's measurement (one shared
    # client all the same: a new httpx.Client per request costs the bench ~30 ms of CPU building its TLS context)
    client = httpx.Client(limits=httpx.Limits(max_connections=clients, max_keepalive_connections=clients if keepalive else 0),
                          timeout=120)

    def one(d):
        t0 = time.perf_counter()
        r = client.post(srv.url + "/v1/classify", files={"file": ("x.png", d, "image/png")})
        return r.json()["route"], 1000 * (time.perf_counter() - t0)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        res = list(ex.map(one, data))
    client.close()
    return res, len(res) / (time.perf_counter() - t0)


def print_rows(label, res, rps):
    for route in ("student", "llm", "human"):
        ms = [m for r, m in res if r == route]
        if ms:
            print(f"{label:>14}{rps:>8.1f}  {route:<8}{len(ms):>6}{statistics.median(ms):>9.1f}{pct(ms, 99):>9.1f}")


def pin(core):
    """preexec_fn: the child runs on one core (where the OS lets us pin)."""
    return (lambda: os.sched_setaffinity(0, {core})) if hasattr(os, "sched_setaffinity") and os.cpu_count() > 1 else None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="a run folder after --step export (default: none, required)")
    p.add_argument("--requests", type=int, default=200, help="requests per client count (default: 200)")
    p.add_argument("--teacher_ms", type=float, default=300.0, help="stand-in teacher latency per answer, ms (default: 300)")
    p.add_argument("--faults", choices=["realistic", "off"], default="realistic",
                   help="stand-in teacher faults: 429 with Retry-After, 503, hangs (default: realistic)")
    p.add_argument("--nodelay", action="store_true", help="the stand-in sets TCP_NODELAY (default: off, as http.server)")
    p.add_argument("--keepalive", action="store_true", help="clients share keep-alive connections (default: a new "
                                                             "connection per request)")
    p.add_argument("--clients", default="1,4,16", help="client thread counts (default: 1,4,16)")
    p.add_argument("--escalate", type=float, default=None, help="serve with --escalation_budget this share, to set "
                                                                 "the route mix (default: the run's own tau)")
    p.add_argument("--with_turn", action="store_true", help="time 4 clients with and without a flywheel turn training "
                                                            "on the same run (default: off)")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    run = tmp / "run"
    shutil.copytree(a.root, run)
    classes = json.loads((run / "classes.json").read_text())
    faults = Faults() if a.faults == "realistic" else None
    try:
        with LoopbackTeacher(classes=classes, latency_s=a.teacher_ms / 1000, nodelay=a.nodelay, faults=faults) as teacher:
            extra = ["--timeout", 3, *(["--num_threads", 1] if a.with_turn else []),
                     *(["--escalation_budget", a.escalate] if a.escalate is not None else [])]
            srv = Server(run, teacher.url, *extra, preexec_fn=pin(0) if a.with_turn else None)
            try:
                for data in uploads(run, 5, seed=99):  # warm-up: sessions, connections
                    srv.classify(data)
                print(f"serve bench: {a.requests} requests per row; SIMULATED loopback teacher at {a.teacher_ms:g} ms, "
                      f"faults {a.faults}, TCP_NODELAY {'on' if a.nodelay else 'off'}; clients "
                      f"{'keep-alive' if a.keepalive else 'new connection per request'}; latency at the client, ms")
                print(f"{'clients':>14}{'req/s':>8}  {'route':<8}{'n':>6}{'p50':>9}{'p99':>9}")
                if a.with_turn:
                    with_turn(srv, run, teacher, a)
                else:
                    for clients in map(int, a.clients.split(",")):
                        print_rows(str(clients), *load(srv, uploads(run, a.requests, seed=clients), clients, a.keepalive))
                print(f"stand-in faults served: {dict(teacher.fault_counts)}")
            finally:
                srv.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def with_turn(srv, run, teacher, a):
    """4 clients alone, then 4 clients while `--step flywheel` trains on the same folder on the other core."""
    print_rows("4", *load(srv, uploads(run, a.requests, seed=4), 4, a.keepalive))
    env = {**os.environ, "OPENROUTER_API_KEY": KEY}
    fly = run / "artifacts" / "flywheel.json"
    next_turn = len(json.loads(fly.read_text())["turns"]) if fly.exists() else 1  # turns 0..k exist: train k+1
    turn = subprocess.Popen([sys.executable, str(ROOT / "cifar_distill.py"), "--step", "flywheel", "--out_dir", str(run),
                             "--llm_base_url", teacher.url, "--num_threads", "1", "--turns", str(next_turn)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(run / "turn.log", "w"),
                            preexec_fn=pin(1))
    time.sleep(20)  # past its imports and relabeling: into training
    res, rps = load(srv, uploads(run, a.requests, seed=44), 4, a.keepalive)
    print_rows("4, turn on", res, rps)
    print(f"turn still running when the load ended: {turn.poll() is None}; its log: {run / 'turn.log'}")
    turn.wait()


if __name__ == "__main__":
    main()

"""Opening a large ledger: labels.jsonl with its SQLite index (flywheel.ledger.Ledger) against the control,
reading every record into memory as the ledger did before the index (flywheel.io.read_jsonl).

    uv run python bench/ledger_bench.py                       # 2,000,000 records
    uv run python bench/ledger_bench.py --records 200000

Writes a synthetic ledger (SIMULATED records shaped like real ones: a raw reply, a reason, tokens, cost),
then, each in a fresh process so memory is its own: the control's load, the first open (builds the
index), a warm open, 10,000 random ok() lookups, total_cost(), and 1,000 appends. Prints seconds and
the process's heap (anonymous RSS from /proc) once the ledger is loaded or opened.
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_ledger(path: Path, n: int, seed=0):
    rng = random.Random(seed)
    classes = ["apple", "mushroom", "orange", "pear", "sweet_pepper"]
    with open(path, "w") as f:
        for i in range(n):
            sha = f"{i // 2:064x}"
            lab = rng.choice(classes)
            conf = round(rng.random(), 2)
            why = "round, red-green skin with a short stem; the background is a wooden table"
            raw = json.dumps({"label": lab, "confidence": conf, "why": why})
            f.write(json.dumps({
                "v": 2, "ts": "2026-11-22T10:00:00+0000", "key": f"{sha}|{1 + i % 2}|google/gemini-2.5-flash|q0123456789abcdef",
                "path": f"images/train/{lab}/{lab}_{i:07d}.jpg", "sha256": sha, "pass": 1 + i % 2,
                "model": "google/gemini-2.5-flash", "host": "openrouter.ai", "prompt_version": "v2",
                "question": "q0123456789abcdef", "source": "oracle", "purpose": "label", "status": "ok", "label": lab,
                "confidence": conf, "why": why, "raw": raw, "error": None, "http_status": 200, "prompt_tokens": 310,
                "completion_tokens": 42, "cost_usd": 0.0002, "cost_estimated": False, "latency_s": 0.8,
                "temperature": 0.0, "class_order": classes}) + "\n")


def rss_anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(mode, path, n):
    """One phase in this process -> prints a JSON line."""
    t0 = time.perf_counter()
    out = {"mode": mode}
    if mode == "control":
        from flywheel.io import read_jsonl
        recs = read_jsonl(path)[0]
        ok = {r["key"]: r for r in recs if r.get("status") == "ok"}
        out.update(seconds=time.perf_counter() - t0, records=len(recs), heap_mb=rss_anon_mb())
        del ok
    else:
        from flywheel.ledger import Ledger
        led = Ledger(path)
        out.update(open_seconds=time.perf_counter() - t0, heap_mb=rss_anon_mb(), records=len(led))
        rng = random.Random(1)
        keys = [f"{(i // 2):064x}|{1 + i % 2}|google/gemini-2.5-flash|q0123456789abcdef"
                for i in (rng.randrange(n) for _ in range(10000))]
        t1 = time.perf_counter()
        hits = sum(led.ok(k) is not None for k in keys)
        out.update(lookups_per_s=len(keys) / (time.perf_counter() - t1), hits=hits)
        t1 = time.perf_counter()
        out.update(total_cost=round(led.total_cost(), 4), total_cost_seconds=time.perf_counter() - t1)
        t1 = time.perf_counter()
        for i in range(1000):
            led.append({"key": f"new{i}", "status": "ok", "label": "pear", "confidence": 0.9, "cost_usd": 0.0002})
        out.update(append_s=(time.perf_counter() - t1), heap_end_mb=rss_anon_mb())
        led.close()
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=2_000_000, help="ledger lines to write (default: 2000000)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], Path(a.child[1]), int(a.child[2]))
    work = Path(tempfile.mkdtemp(prefix="ledger_bench."))
    try:
        path = work / "labels.jsonl"
        t0 = time.perf_counter()
        write_ledger(path, a.records)
        print(f"wrote {a.records:,} SIMULATED records ({path.stat().st_size / 2**20:.0f} MB) in "
              f"{time.perf_counter() - t0:.0f}s; {os.cpu_count()} CPU(s)", flush=True)

        def run(mode):
            r = subprocess.run([sys.executable, __file__, "--child", mode, str(path), str(a.records)],
                               capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            if r.returncode:
                sys.exit(r.stderr[-2000:])
            return json.loads(r.stdout.strip().splitlines()[-1])
        c = run("control")
        print(f"control (read every record into memory):  {c['seconds']:6.1f} s, heap {c['heap_mb']:6.0f} MB")
        for label, mode in (("first open (builds the index)", "first"), ("warm open (index current)", "warm")):
            r = run(mode)
            print(f"{label:<42}{r['open_seconds']:6.2f} s, heap {r['heap_mb']:6.0f} MB | {r['lookups_per_s']:,.0f} "
                  f"ok() lookups/s | total_cost {r['total_cost_seconds']:.2f} s | 1,000 appends "
                  f"{r['append_s']:.2f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""How the pipeline grows with the data: synthetic 10-class image folders of 10k, 30k and 60k images run
through prep, label (SIMULATED oracle teacher), one training epoch, eval and the cascade, each step in
its own process. Prints wall time and peak heap (anonymous RSS, sampled every 20 ms from /proc) per step.

    uv run python bench/scale_bench.py                          # 10k, 30k, 60k at 96px
    uv run python bench/scale_bench.py --sizes 10000 --keep /tmp/scale   # keep the folders to look at

Each size N is split 5/6 train, 1/6 test; the teacher labels 4/6 of N (gold 100 included), which
leaves a pool of N/6 unlabeled training images for the cascade, beside the N/6 test images. Images are
random textures tinted by class (synthetic, SIMULATED data): the figures measure the machinery, not a
real dataset. Peak heap excludes the memory-mapped image cache (file-backed pages the kernel can drop)
and is a sampled maximum, so a spike shorter than 20 ms can be missed.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = [f"class{i}" for i in range(10)]
STEPS = ["prep", "label", "train", "eval", "cascade"]


def make_folder(root: Path, n: int, src_px: int = 32, seed: int = 0):
    """root/{train,test}/<class>/<i>.png: n images, 5/6 train, a class tint over random texture."""
    rng = np.random.default_rng(seed)
    tints = rng.integers(40, 216, (len(CLASSES), 3))
    n_test = n // 6
    jobs = []
    for i in range(n):
        split = "test" if i < n_test else "train"
        c = i % len(CLASSES)
        jobs.append((root / split / CLASSES[c] / f"{i:06d}.png", c, i))
    for d in {p.parent for p, _, _ in jobs}:
        d.mkdir(parents=True, exist_ok=True)

    def one(job):
        path, c, i = job
        r = np.random.default_rng([seed, i])
        other = r.integers(len(CLASSES))
        a = r.uniform(0, 0.6)  # blend toward another class: some images are ambiguous
        rgb = (1 - a) * tints[c] + a * tints[other]
        img = np.clip(rgb + r.normal(0, 30, (src_px, src_px, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(path)

    with ThreadPoolExecutor(os.cpu_count() or 2) as ex:
        list(ex.map(one, jobs))


def rss_anon_kb(pid) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_step(args, log_path):
    """Run one step in its own process -> (seconds, peak anonymous RSS in MB, exit code)."""
    peak, done = [0], threading.Event()
    t0 = time.perf_counter()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "cifar_distill.py"), *map(str, args)], stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss_anon_kb(proc.pid))
                time.sleep(0.02)
        t = threading.Thread(target=sample, daemon=True)
        t.start()
        rc = proc.wait()
        done.set()
        t.join()
    return time.perf_counter() - t0, peak[0] / 1024, rc


def one_size(n, a, work: Path):
    data, out = work / f"data{n}", work / f"run{n}"
    t0 = time.perf_counter()
    make_folder(data, n)
    print(f"# {n} images generated in {time.perf_counter() - t0:.0f}s under {data}", flush=True)
    common = ["--out_dir", out, "--dataset", "folder", "--data_root", data, "--teacher", "oracle",
              "--oracle_noise", a.oracle_noise, "--seed", 0]
    per_step = {
        "prep": ["--img_size", a.img_size],
        "label": ["--max_label", 4 * n // 6, "--gold_n", 100, "--max_usd", 1e6],
        "train": ["--epochs", 1, "--weights", "none", "--batch_size", 128],
        "eval": [],
        "cascade": ["--max_usd", 1e6],
    }
    rows = {}
    for step in STEPS:
        secs, heap, rc = run_step(["--step", step, *common, *per_step[step]], work / f"log{n}.txt")
        rows[step] = (secs, heap)
        print(f"  {n:>6} {step:<8} {secs:7.1f} s  peak heap {heap:7.0f} MB" + (f"  FAILED rc={rc}" if rc else ""),
              flush=True)
        if rc:
            print(open(work / f"log{n}.txt").read()[-3000:])
            break
    if not a.keep:
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,30000,60000", help="images per dataset (default: 10000,30000,60000)")
    ap.add_argument("--img_size", type=int, default=96, help="prep's image side in pixels (default: 96)")
    ap.add_argument("--oracle_noise", type=float, default=0.1, help="SIMULATED teacher's error rate (default: 0.1)")
    ap.add_argument("--keep", default=None, help="keep folders and logs under this path (default: a temp folder, "
                                                 "removed)")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="scale_bench."))
    work.mkdir(parents=True, exist_ok=True)
    print(f"scale bench: {sizes} images, {a.img_size}px, SIMULATED oracle teacher (noise {a.oracle_noise}), "
          f"{os.cpu_count()} CPU(s); logs in {work}", flush=True)
    table = {n: one_size(n, a, work) for n in sizes}
    print("\nwall seconds / peak heap MB (anonymous RSS) per step")
    print("| step | " + " | ".join(f"{n:,} images" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for step in STEPS:
        cells = [f"{table[n][step][0]:.0f} s / {table[n][step][1]:.0f} MB" if step in table[n] else "n/a"
                 for n in sizes]
        print(f"| {step} | " + " | ".join(cells) + " |")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

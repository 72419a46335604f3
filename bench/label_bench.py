"""Label step against the loopback OpenAI-compatible server (127.0.0.1, no network): throughput under a
concurrency limit, calls per accepted label (always vs adaptive second pass), and accepted-label
accuracy against the server's raw accuracy.

    uv run python bench/label_bench.py                        # defaults below
    uv run python bench/label_bench.py --images 300 --latency 0.2 --limit 8 --workers 8

The server sleeps --latency s per answer, answers 429 (Retry-After 0.05 s) past --limit requests in
flight, gives a wrong label --wrong of the time at confidence 0.6 (right ones at 0.93).
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fakes import make_cifar_folder, run_cli  # noqa: E402
from flywheel.io import read_csv, read_json  # noqa: E402
from loopback import LoopbackTeacher  # noqa: E402

CLASSES = ["apple", "mushroom", "orange", "pear", "sweet_pepper"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=200, help="images to label (default: 200)")
    p.add_argument("--latency", type=float, default=0.1, help="server seconds per answer (default: 0.1)")
    p.add_argument("--limit", type=int, default=8, help="server concurrency before 429 (default: 8)")
    p.add_argument("--workers", type=int, default=8, help="--max_workers of the label step (default: 8)")
    p.add_argument("--wrong", type=float, default=0.15, help="server's raw wrong-label rate (default: 0.15)")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="label_bench_"))
    os.environ["OPENROUTER_API_KEY"] = "sk-bench-loopback"
    try:
        make_cifar_folder(tmp / "data", n_train=a.images // 5 + 1, n_test=1)
        run_cli("--step", "prep", "--out_dir", tmp / "base", "--data_root", tmp / "data", "--img_size", 32, "--log_level", "WARNING")
        truth = {r["sha256"]: r["label"] for r in read_csv(tmp / "base" / "manifest.csv")}
        rows = {}
        for mode in ("always", "adaptive"):
            out = tmp / mode
            shutil.copytree(tmp / "base", out)
            with LoopbackTeacher(truth, CLASSES, latency_s=a.latency, max_concurrency=a.limit, wrong_rate=a.wrong,
                                 wrong_confidence=0.6, seed=7) as srv:
                t0 = time.perf_counter()
                run_cli("--step", "label", "--out_dir", out, "--data_root", tmp / "data", "--llm_base_url", srv.url,
                        "--max_label", a.images, "--max_workers", a.workers, "--second_pass", mode, "--log_level", "WARNING")
                wall = time.perf_counter() - t0
                s = read_json(out / "label_summary.json")
                rows[mode] = (wall, s, srv.rejected_429, srv.wrong_answers / max(srv.answers, 1))
        print(f"loopback teacher: {a.images} images, {a.latency * 1000:.0f} ms/answer, 429 past {a.limit} in flight, "
              f"{a.workers} workers, raw wrong rate {a.wrong}")
        print(f"{'second pass':<12}{'calls':>7}{'wall s':>8}{'ideal s':>9}{'ratio':>7}{'429s':>6}{'calls/accepted':>16}"
              f"{'accepted':>10}{'raw acc':>9}{'accepted acc':>14}")
        for mode, (wall, s, r429, wrong) in rows.items():
            ideal = s["calls"] * a.latency / min(a.limit, a.workers)
            print(f"{mode:<12}{s['calls']:>7}{wall:>8.2f}{ideal:>9.2f}{wall / ideal:>7.2f}{r429:>6}"
                  f"{s['calls_per_accepted']:>16.3f}{s['accepted']:>10}{1 - wrong:>9.3f}{s['teacher_accuracy']:>14.3f}")
        al, ad = rows["always"][1], rows["adaptive"][1]
        print(f"adaptive saves {1 - ad['calls'] / al['calls']:.1%} of calls; accepted-label accuracy "
              f"{al['teacher_accuracy']:.3f} (always) vs {ad['teacher_accuracy']:.3f} (adaptive)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

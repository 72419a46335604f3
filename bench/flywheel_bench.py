"""One offline flywheel turn on the synthetic colour set with the SIMULATED oracle teacher (with label
noise) and a SIMULATED human: turn 0 against turn 1 on test accuracy, escalation rate at 0.95 target
precision, and LLM calls per 1,000 items served against sending every item to the LLM.

    uv run python bench/flywheel_bench.py
    uv run python bench/flywheel_bench.py --noise 0.2 --relabel_n 80 --epochs 6

Everything here is simulated (teacher, human, images); it measures the machinery, not CIFAR-100.
"""
import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fakes import make_cifar_folder, run_cli  # noqa: E402
from flywheel.io import read_json  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--noise", type=float, default=0.1, help="oracle label noise (default: 0.1)")
    p.add_argument("--per_class", type=int, default=80, help="synthetic training images per class (default: 80)")
    p.add_argument("--max_label", type=int, default=200, help="images the teacher labels first (default: 200)")
    p.add_argument("--relabel_n", type=int, default=60, help="pool items relabeled in the turn (default: 60)")
    p.add_argument("--epochs", type=int, default=5, help="epochs per training (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="flywheel_bench_"))
    try:
        make_cifar_folder(tmp / "data", n_train=a.per_class, n_test=20, mix=0.55, seed=a.seed)
        common = ["--out_dir", tmp / "run", "--data_root", tmp / "data", "--teacher", "oracle", "--oracle_noise", a.noise,
                  "--simulate_human", "--seed", a.seed, "--log_level", "WARNING"]
        run_cli("--step", "prep", *common, "--img_size", 32)
        run_cli("--step", "label", *common, "--max_label", a.max_label)
        train = ["--weights", "none", "--epochs", a.epochs, "--batch_size", 16, "--val_frac", 0.25]
        run_cli("--step", "train", *common, *train)
        run_cli("--step", "eval", *common)
        run_cli("--step", "cascade", *common)
        run_cli("--step", "flywheel", *common, *train, "--turns", 1, "--relabel_n", a.relabel_n)
        fly = read_json(tmp / "run" / "artifacts" / "flywheel.json")["turns"]
        cas = [read_json(tmp / "run" / "artifacts" / "cascade.json"),
               read_json(tmp / "run" / "artifacts" / "turn_1" / "cascade.json")]
        print(f"SIMULATED: oracle teacher (noise {a.noise}), simulated human, synthetic 32px colour images; "
              f"{a.max_label} labeled + {a.relabel_n} relabeled, {a.epochs} epochs, seed {a.seed}")
        print(f"{'turn':>4}{'labeled':>9}{'test acc':>10}{'macro-F1':>10}{'tau':>7}{'escalation':>12}"
              f"{'cascade acc':>13}{'LLM calls/1k':>14}{'LLM-only/1k':>13}")
        for t, c in zip(fly, cas):
            s = c["test"]
            print(f"{t['turn']:>4}{t['n_labeled']:>9}{t['accuracy']:>10.3f}{t['macro_f1']:>10.3f}{c['tau']:>7.3f}"
                  f"{t['escalation_rate']:>12.3f}{s['accuracy']:>13.3f}{1000 * s['llm_calls'] / s['n']:>14.0f}"
                  f"{1000 * s['llm_only_calls'] / s['n']:>13.0f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

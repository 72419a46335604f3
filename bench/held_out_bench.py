"""The label step's held-out model on real images: how well each candidate (flywheel/quality.py HELD_OUT)
separates the teacher's right first answers from its wrong ones, as AUROC against the ground truth of every
answer (the label step sees only gold pins; here every image's truth is known).

    uv run python bench/held_out_bench.py                                    # 2 datasets x 2 teachers x 3 seeds
    uv run python bench/held_out_bench.py --datasets fashion --teachers classifier --seeds 1

Real images: Fashion-MNIST's allowed five classes (the other five are never read) and scikit-learn's digits.
The teachers are SIMULATED (bench/real_images.py), fitted on --teacher_fit held-out images per class:
classifier (a logistic regression's own answers: per-image errors a model of the images can learn) and
confusion (its held-out confusion rates and confidences drawn per image: class-conditional errors). Each
setting preps the images with the pipeline (--img_size), reads them as the label step does
(quality.represent) and judges the teacher's answers with each candidate. "confidence" is the teacher's
stated confidence, for comparison. Prints one line per setting, then mean ± std per candidate.
"""
import argparse
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported: the bench prints its own lines
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import numpy as np  # noqa: E402

from common import mean_std, over_seeds  # noqa: E402
from fakes import run_cli  # noqa: E402
from flywheel import quality  # noqa: E402
from flywheel.io import read_csv  # noqa: E402
from real_images import make_data  # noqa: E402


def one_setting(tmp, a, dataset, teacher, seed):
    """-> {candidate: AUROC on every first answer}, the teacher's accuracy and the number of answers."""
    d = tmp / f"{dataset}_{teacher}_{seed}"
    s = SimpleNamespace(dataset=dataset, teacher=teacher, teacher_fit=a.teacher_fit, seed=seed,
                        train_per_class=a.per_class if dataset == "fashion" else a.digits_per_class, test_per_class=a.test_per_class, teacher_held=a.teacher_held)
    answers, acc, _ = make_data(d, s, seed)
    run_cli("--step", "prep", "--dataset", "folder", "--data_root", d / "data", "--out_dir", d / "run",
            "--img_size", a.img_size, "--log_level", "WARNING")
    rows = [r for r in read_csv(d / "run" / "manifest.csv") if r["split"] == "train"]
    classes = sorted({r["label"] for r in rows})
    said = [answers[r["source_index"]] for r in rows]
    y = np.array([classes.index(lab) for lab, _ in said])
    right = np.array([lab == r["label"] for (lab, _), r in zip(said, rows)])
    out = {"confidence": quality.auroc([c for _, c in said], right.tolist())}
    read = {}
    for name, (reading, _) in quality.HELD_OUT.items():
        if reading not in read:
            read[reading] = quality.represent(reading, [d / "run" / r["path"] for r in rows])
        probs = quality.held_out_probs(name, read[reading], y, len(classes), seed=seed)
        out[name] = quality.auroc(probs[np.arange(len(y)), y].tolist(), right.tolist())
    return {"auroc": out, "teacher_acc": acc, "n": len(y)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="fashion,digits", help="comma-separated: fashion, digits (default: fashion,digits)")
    p.add_argument("--teachers", default="classifier,confusion",
                   help="comma-separated SIMULATED teachers: classifier, confusion (default: classifier,confusion)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per setting (default: 3)")
    p.add_argument("--per_class", type=int, default=300, help="training images per class answered (default: 300)")
    p.add_argument("--digits_per_class", type=int, default=120,
                   help="digits: training images per class answered; 1,797 images leave room for 120 beside the "
                        "test, fit and held-out images (default: 120)")
    p.add_argument("--test_per_class", type=int, default=20, help="test images per class, prepped, never judged (default: 20)")
    p.add_argument("--teacher_fit", type=int, default=6, help="held-out images per class the teacher is fitted on (default: 6)")
    p.add_argument("--teacher_held", type=int, default=20,
                   help="confusion teacher: held-out images per class its confusions are measured on (default: 20)")
    p.add_argument("--img_size", type=int, default=96, help="prep's image side in px (default: 96)")
    a = p.parse_args(argv)
    names = ["confidence", *quality.HELD_OUT]
    t0, results = time.time(), {}
    for dataset in a.datasets.split(","):
        for teacher in a.teachers.split(","):
            def one(tmp, seed, dataset=dataset, teacher=teacher):
                r = one_setting(tmp, a, dataset, teacher, seed)
                print(f"{dataset} {teacher} seed {seed}: {r['n']} answers, teacher {100 * r['teacher_acc']:.1f}% right; AUROC "
                      + ", ".join(f"{k} {r['auroc'][k]:.3f}" for k in names), flush=True)
                return r
            results[dataset, teacher] = over_seeds("held_out_bench_", one, a.seeds)[0]
    print(f"\nAUROC of each held-out model for 'the first answer is right', every answer judged ({time.time() - t0:.0f} s; "
          "SIMULATED teachers, real images)")
    print("| setting | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for (dataset, teacher), rs in results.items():
        print(f"| {dataset}, {teacher} | " + " | ".join(mean_std([r["auroc"][k] for r in rs], nd=3) for k in names) + " |")


if __name__ == "__main__":
    main()

"""Serving's out-of-distribution check on real images: the default (the student's own features, then raw 12x12
thumbnails, either enough, each at the 99.5th percentile of validation distances) against each alone at the
99th percentile, on the same trained and exported student.

The student is trained on Debian's Fashion-MNIST restricted to the five classes the project may use (trouser,
dress, sandal, sneaker, ankle boot; the other five are never read), labeled by the SIMULATED oracle at noise 0
(ground truth: label quality is not what this measures). Uploads it should take: unseen Fashion-MNIST test
images of those classes. Uploads it should send to a person: scikit-learn's digits (another kind of image,
same grey-on-black look), colour-coded synthetic images (tests/fakes.py), and uniform noise.

    uv run python bench/ood_bench.py                 # 2 seeds, EfficientNet-Lite0 pretrained, 64px
    uv run python bench/ood_bench.py --seeds 1 --student mobilenet_v3_small --weights none

Prints the share of each probe set sent to a person, per representation, mean ± std over seeds.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from common import mean_std, over_seeds  # noqa: E402
from fakes import make_image_folder, run_cli  # noqa: E402
from flywheel.io import read_csv  # noqa: E402
from real_images import digits, fashion, sample, write_folder  # noqa: E402


def probes(d, seed, n):
    """{name: [PIL images]}: what serving should take (fashion test images) and what it should not."""
    rng = np.random.default_rng(seed)
    xt, yt = fashion("test")
    te = sample(xt, yt, n // 5, rng)
    xd, _ = digits()
    dig = rng.choice(len(xd), n, replace=False)
    make_image_folder(d / "colour", n_train=n // 3 + 1, n_test=1, size=28)
    colour = sorted(f for f in (d / "colour" / "train").rglob("*") if f.is_file())[:n]
    return {"fashion test (should pass)": [Image.fromarray(x).convert("RGB") for x in xt[te]],
            "digits (should go to a person)": [Image.fromarray(x).resize((28, 28)).convert("RGB") for x in xd[dig]],
            "colour blocks (should go to a person)": [Image.open(f).convert("RGB") for f in colour],
            "uniform noise (should go to a person)": [Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8))
                                                      for _ in range(n)]}


def one_seed(tmp, seed, a):
    from flywheel.export import ort_session
    from flywheel.ood import OODModel, fit_ood, fit_ood_features
    d = tmp / f"seed{seed}"
    x, y = fashion("train")
    tr = sample(x, y, a.per_class, np.random.default_rng(seed))
    write_folder(d / "data", {"train": (x[tr], y[tr], tr), "test": (x[tr[:10]], y[tr[:10]], tr[:10])})
    common = ["--out_dir", d / "run", "--data_root", d / "data", "--dataset", "folder", "--teacher", "oracle",
              "--oracle_noise", 0, "--seed", seed, "--log_level", "WARNING"]
    run_cli("--step", "prep", *common, "--img_size", a.img_size)
    run_cli("--step", "label", *common, "--max_label", 5 * a.per_class - 1, "--second_pass", "always")
    run_cli("--step", "train", *common, "--student", a.student, "--weights", a.weights, "--epochs", a.epochs,
            "--batch_size", 64)
    run_cli("--step", "export", *common)
    run = d / "run"
    both = OODModel.load(run / "artifacts" / "ood.npz")  # what export fitted: the default
    rows = read_csv(run / "artifacts" / "train_rows.csv")
    files = [[run / r["path"] for r in rows if r["split"] == s] for s in ("train", "val")]
    sess = ort_session(run / "artifacts" / "mobilenet.onnx")
    pixels, feats = fit_ood(*files, seed), fit_ood_features(sess, *files, seed)  # each alone, at the 99th percentile
    out = {}
    for name, imgs in probes(d, seed, a.probes).items():
        f = [sess.run(["features"], {"image": np.asarray(im)[None]})[0][0] for im in imgs]
        out[name] = {k: float(np.mean([m.reason(im, v) is not None for im, v in zip(imgs, f)]))
                     for k, m in (("both", both), ("features", feats), ("pixels", pixels))}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=2, help="seeds: training images, probes, training (default: 2)")
    p.add_argument("--per_class", type=int, default=300, help="training images per class (default: 300)")
    p.add_argument("--probes", type=int, default=200, help="images per probe set (default: 200)")
    p.add_argument("--img_size", type=int, default=64, help="prep's image side in px (default: 64)")
    p.add_argument("--student", default="efficientnet_lite0", help="the student (default: efficientnet_lite0)")
    p.add_argument("--weights", default="imagenet", help="its init (default: imagenet)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs (default: 3)")
    a = p.parse_args()
    seeds, secs = over_seeds("ood_bench_", lambda tmp, s: one_seed(tmp, s, a), a.seeds)
    print(f"share sent to a person by the OOD check (threshold: 99th percentile of validation distances); student "
          f"{a.student} ({a.weights}), {a.img_size}px, {a.per_class}/class Fashion-MNIST training images (5 allowed "
          f"classes), {a.probes} images per probe set, {a.seeds} seed(s), mean ± std; {secs:.0f}s")
    print(f"{'probe set':<40}{'both (default)':>16}{'student features':>18}{'12x12 pixels':>16}")
    for name in seeds[0]:
        print(f"{name:<40}" + "".join(f"{mean_std([s[name][k] for s in seeds], 100):>{w}}%"
                                      for k, w in (("both", 15), ("features", 17), ("pixels", 15))))


if __name__ == "__main__":
    main()

"""Label quality per QC rule: the real label step against the loopback stand-in teacher (127.0.0.1, no
network), SIMULATED by tests/loopback.py's TeacherProfile: per-image difficulty (errors gather on hard
images and repeat), look-alike class pairs, images blended toward their look-alike class (weight up to
0.6) with a --coupling share of the teacher's difficulty read from that blend (so the held-out model is
fooled by the same images as the teacher on that share, and only the rest is catchable), a second model whose errors partly overlap the first's,
faults (429, 5xx, prose, fences, label variants), and stated confidence that is either informative
(falls with difficulty, noisy, never a fixed low value for wrong answers) or flat (0.95 / 0.99 whatever
the image).

    uv run python bench/label_quality.py                     # 1,500 images, 3 seeds, both modes
    uv run python bench/label_quality.py --images 500 --seeds 1
    uv run python bench/label_quality.py --coupling 1.0       # every teacher error visible in the image

For each rule it prints accepted-label accuracy minus the raw teacher (the primary model's first
answer at T=0 on the same requested images), yield (accepted / requested) and paid calls per requested
image (gold pins included), as mean +- std over seeds. Rules:
  original   the original tool: two T=0 calls, accept when they agree
  v1-default the previous default: a second call at T=0.7 in another class order, agree and mean conf >= 0.7
  conf-only  --second_pass fitted --gold_n 100 --confident_learning off: the threshold on stated
             confidence fitted on gold at the lower 95% bound (the previous session's rule)
  default    the defaults plus --gold_n 100: the same, plus confident learning (a held-out model's
             flags send contradicted labels to review, when gold trusts them)
  default+2nd the same, with --second_model answering the second pass
"""
import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]


from common import mean_std, quiet_offline_workdir  # noqa: E402
from fakes import COLOURS, make_cifar_folder, mean_rgb, run_cli  # noqa: E402
from flywheel.io import read_csv, read_json  # noqa: E402
from loopback import LOOKALIKES, LoopbackTeacher, TeacherProfile  # noqa: E402

CLASSES = ["apple", "mushroom", "orange", "pear", "sweet_pepper"]
RULES = {
    "original": ["--second_pass", "always", "--second_temp", "0", "--conf_thresh", "0"],
    "v1-default": ["--second_pass", "always", "--second_temp", "0.7", "--conf_thresh", "0.7"],
    "conf-only": ["--second_pass", "fitted", "--gold_n", "100", "--min_gold_acc", "0", "--confident_learning", "off"],
    "default": ["--gold_n", "100", "--min_gold_acc", "0"],
    "default+2nd": ["--gold_n", "100", "--min_gold_acc", "0", "--second_model", "sim/second-model"],
}
GOALS = {"informative": (6.0, 0.75, 1.4), "flat": (4.0, 0.75, 1.6)}  # points over raw, yield, calls/image


LOOKALIKE_MIX = 0.6  # images are blended toward their look-alike by up to this weight


def ambiguity(prepped):
    """{sha256: a in [0, 1]}: how far each image's mean colour has moved toward its look-alike class's
    colour, measured from the pixels (the blend weight / LOOKALIKE_MIX)."""
    import numpy as np
    out = {}
    for r in read_csv(prepped / "manifest.csv"):
        own, look = np.array(COLOURS[r["label"]], float), np.array(COLOURS[LOOKALIKES[r["label"]]], float)
        w = float((mean_rgb(prepped / r["path"]) - own) @ (look - own) / ((look - own) @ (look - own)))
        out[r["sha256"]] = min(max(w / LOOKALIKE_MIX, 0.0), 1.0)
    return out


def one_run(prepped, tmp, rule, mode, seed, n_images, accuracy, amb, coupling):
    run = tmp / f"{rule}-{mode}-{seed}"
    shutil.copytree(prepped, run)
    truth = {r["sha256"]: r["label"] for r in read_csv(run / "manifest.csv")}
    profile = TeacherProfile(CLASSES, accuracy=accuracy, conf_mode=mode, seed=seed, ambiguity=amb, coupling=coupling)
    with LoopbackTeacher(truth, CLASSES, profile=profile, cost=0.0002) as srv:
        run_cli("--step", "label", "--out_dir", run, "--data_root", tmp / "data", "--llm_base_url", srv.url,
                "--llm_model", "sim/primary-model", "--max_label", n_images, "--max_workers", 10, "--seed", seed,
                "--log_level", "WARNING", *RULES[rule])
        first = srv.first_answers
    s = read_json(run / "label_summary.json")
    manifest = {r["path"]: r for r in read_csv(run / "manifest.csv")}
    requested = [r["path"] for r in read_csv(run / "review_labels.csv")]
    raw = [first[(manifest[p]["sha256"], "sim/primary-model")] == manifest[p]["label"] for p in requested
           if (manifest[p]["sha256"], "sim/primary-model") in first]
    shutil.rmtree(run)
    est = s.get("estimated_accuracy") or {}
    student = (s.get("qc_rule") or {}).get("student") or {}
    return {"raw": sum(raw) / len(raw), "acc": s["teacher_accuracy"], "yield": s["accepted"] / s["requested_images"],
            "flagged": s.get("flagged", 0) / s["requested_images"], "cl_auroc": student.get("auroc"),
            "cl_used": bool(student.get("trusted")),
            "calls": s["calls"] / s["requested_images"], "est": est.get("accuracy"),
            "threshold": (s.get("qc_rule") or {}).get("threshold"), "trusted": (s.get("qc_rule") or {}).get("trusted_confidence")}


ms = mean_std


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1500, help="images requested per label run (default: 1500)")
    p.add_argument("--seeds", type=int, default=3, help="seeds (stand-in difficulty draws and QC audit) (default: 3)")
    p.add_argument("--accuracy", type=float, default=0.83, help="stand-in teacher's raw accuracy at T=0 (default: 0.83)")
    p.add_argument("--coupling", type=float, default=0.5,
                   help="share of the teacher's difficulty visible in the image, 0-1 (default: 0.5)")
    a = p.parse_args()
    tmp = quiet_offline_workdir("label_quality_")
    t0 = time.time()
    try:
        make_cifar_folder(tmp / "data", n_train=a.images // 5 + 1, n_test=1, classes=CLASSES,
                          lookalike_mix=LOOKALIKE_MIX)
        run_cli("--step", "prep", "--data_root", tmp / "data", "--out_dir", tmp / "prepped", "--img_size", 16,
                "--log_level", "WARNING")
        amb = ambiguity(tmp / "prepped")
        rows = {}
        for mode in ("informative", "flat"):
            for rule in RULES:
                rows[(mode, rule)] = [one_run(tmp / "prepped", tmp, rule, mode, s, a.images, a.accuracy, amb, a.coupling)
                                      for s in range(a.seeds)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"SIMULATED teacher (tests/loopback.py TeacherProfile, raw accuracy {a.accuracy}, coupling {a.coupling}), {a.images} images "
          f"requested per run, {a.seeds} seeds, mean ± std; {time.time() - t0:.0f}s")
    print(f"{'confidence':<12}{'rule':<12}{'raw acc %':>12}{'accepted acc %':>16}{'vs raw (pts)':>15}{'yield %':>14}"
          f"{'calls/img':>13}{'est. acc % (gold)':>19}  goal")
    for (mode, rule), rs in rows.items():
        pts, y, c = GOALS[mode]
        gain = [100 * (r["acc"] - r["raw"]) for r in rs]
        met = (statistics.mean(gain) >= pts and statistics.mean(r["yield"] for r in rs) >= y
               and statistics.mean(r["calls"] for r in rs) <= c)
        print(f"{mode:<12}{rule:<12}{ms([r['raw'] for r in rs], 100):>12}{ms([r['acc'] for r in rs], 100):>16}"
              f"{ms(gain):>15}{ms([r['yield'] for r in rs], 100):>14}{ms([r['calls'] for r in rs], 1, 2):>13}"
              f"{ms([r['est'] for r in rs], 100):>19}  {'met' if met else 'not met'} (>= +{pts:g}, >= {y:.0%}, <= {c})")
    for mode in ("informative", "flat"):
        d = rows[(mode, "default")]
        print(f"{mode}: default rule per seed: thresholds {[r['threshold'] for r in d]}; held-out model AUROC on gold "
              f"{[r['cl_auroc'] for r in d]}, flags used {[r['cl_used'] for r in d]}, flagged {ms([r['flagged'] for r in d], 100)}% of images")


if __name__ == "__main__":
    main()

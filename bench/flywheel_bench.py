"""One flywheel turn per relabel strategy against its controls, over several seeds: turn 0, then a
targeted, a random and a margin turn from the same turn-0 run, with the same relabel budget and the
same epochs, and no simulated human. Labels come from the real label step against a loopback stand-in
teacher (SIMULATED). On synthetic 32px colour images (--dataset synthetic) it is tests/loopback.py's
TeacherProfile: errors gather on hard images, look-alike pairs, faults, informative-but-noisy confidence.
On real images (--dataset fashion: Fashion-MNIST's five allowed classes; digits) it is bench/real_images.py's
classifier teacher (a pixel classifier's own answers) or confusion teacher (its held-out confusions, drawn
per image), as in bench/student_bench.py.

    uv run python bench/flywheel_bench.py --seeds 5        # issue 12's setting: one turn of 300 relabels
    uv run python bench/flywheel_bench.py --seeds 5 --per_class 120 --max_label 200 --relabel_n 100   # a small pool
    uv run python bench/flywheel_bench.py --dataset fashion --seeds 3 --no_pseudo            # real images, from scratch
    uv run python bench/flywheel_bench.py --dataset fashion --seeds 3 --no_pseudo --teacher confusion

Prints test accuracy, escalation rate at --target_precision 0.95, LLM calls per 1,000 test items and
labels added per dollar, as mean ± std over seeds; and, for turn 0's cascade on the test split, the
combined rule (--contest_below 0.5) against the student-then-LLM rule on the same LLM answers, and
what label noise costs the turn-0 student (--measure_noise_cost). The teacher is always simulated; on
--dataset synthetic the images are too, and it measures the machinery, not CIFAR-100.
"""
import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from common import INITS, mean_std, over_seeds  # noqa: E402
from fakes import make_cifar_folder, run_cli  # noqa: E402
from flywheel.io import read_csv, read_json  # noqa: E402
from loopback import LoopbackTeacher, TeacherProfile  # noqa: E402
from real_images import add_teacher_args, answer_server, answers_by_sha, make_data  # noqa: E402

CLASSES = ["apple", "mushroom", "orange", "pear", "sweet_pepper"]
ARMS = ("targeted", "random", "margin", "targeted+pseudo")  # the last: targeted with --pseudo_labels on


def teacher(d, seed, a):
    """Make the seed's image folder d/data and prep it into d/run; -> the SIMULATED loopback teacher answering
    for its images, and its raw accuracy on the training images."""
    common = ["--data_root", d / "data", "--seed", seed, "--log_level", "WARNING"]
    if a.dataset == "synthetic":
        make_cifar_folder(d / "data", n_train=a.per_class, n_test=a.test_per_class, mix=0.55, seed=seed)
        run_cli("--step", "prep", "--out_dir", d / "run", *common, "--img_size", a.img_size)
        truth = {r["sha256"]: r["label"] for r in read_csv(d / "run" / "manifest.csv")}
        return LoopbackTeacher(truth, CLASSES, profile=TeacherProfile(CLASSES, accuracy=a.accuracy, seed=seed),
                               cost=0.0002), a.accuracy
    answers, acc, _ = make_data(d, argparse.Namespace(**vars(a), train_per_class=a.per_class), seed)
    run_cli("--step", "prep", "--dataset", "folder", "--out_dir", d / "run", *common, "--img_size", a.img_size)
    return answer_server(answers_by_sha(d / "run", answers), cost=0.0002), acc


def one_seed(tmp, seed, a):
    d = tmp / f"seed{seed}"
    srv, raw = teacher(d, seed, a)
    common = ["--data_root", d / "data", "--seed", seed, "--log_level", "WARNING", "--llm_model", "sim/teacher"]
    train = [*INITS[a.init], "--epochs", a.epochs, "--batch_size", 32]
    out = {"teacher_acc": raw}
    with srv:
        c = ["--out_dir", d / "run", *common, "--llm_base_url", srv.url]
        run_cli("--step", "label", *c, "--max_label", a.max_label)
        run_cli("--step", "train", *c, *train, "--measure_noise_cost")  # turn 0 also trains on ground truth
        run_cli("--step", "eval", *c)
        out["noise"] = read_json(d / "run" / "artifacts" / "eval.json")["noise_cost"]
        run_cli("--step", "cascade", *c)
        out["rules"] = read_json(d / "run" / "artifacts" / "cascade.json")["rule_comparison"]
        for arm in arms(a):
            shutil.copytree(d / "run", d / arm)
            run_cli("--step", "flywheel", "--out_dir", d / arm, *common, "--llm_base_url", srv.url, *train,
                    "--turns", 1, "--relabel_n", a.relabel_n, "--relabel_strategy", arm.split("+")[0],
                    "--paid_answers", a.paid_answers, "--pseudo_labels", "on" if arm.endswith("+pseudo") else "off")
            out[arm] = read_json(d / arm / "artifacts" / "flywheel.json")["turns"]
            out[arm][1]["promoted"] = read_json(d / arm / "artifacts" / "promoted.json")["turn"]
    shutil.rmtree(d)
    return out


ms = mean_std


def arms(a):
    return [arm for arm in ARMS if not (a.no_pseudo and arm.endswith("+pseudo"))]


def print_rules(rules):
    """Turn 0's cascade on the test split, the combined rule against student-then-LLM on the same answers."""
    print(f"turn 0 cascade on test, same LLM answers for both rules (--contest_below {rules[0]['contest_below']}):")
    print(f"{'rule':<18}{'wrong, no person':>18}{'to a person':>14}{'accuracy w/o person %':>23}")
    for name in ("student_then_llm", "combined"):
        t = [r[name] for r in rules]
        print(f"{name:<18}{ms([x['wrong_without_person'] for x in t], nd=1):>18}{ms([x['to_person'] for x in t], nd=1):>14}"
              f"{ms([100 * x['accuracy_without_person'] for x in t]):>23}")
    print(f"contested LLM labels: {ms([r['contested'] for r in rules], nd=1)}, of which the LLM was wrong on "
          f"{ms([r['contested_llm_wrong'] for r in rules], nd=1)}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds: data, stand-in teacher and training (default: 3)")
    p.add_argument("--dataset", choices=["synthetic", "fashion", "digits"], default="synthetic",
                   help="synthetic colour images, or real ones: Fashion-MNIST's five allowed classes, digits (default: synthetic)")
    p.add_argument("--per_class", type=int, default=600, help="training images per class (default: 600)")
    p.add_argument("--test_per_class", type=int, default=100, help="test images per class (default: 100)")
    p.add_argument("--img_size", type=int, default=32, help="prep's image side in px (default: 32)")
    p.add_argument("--init", choices=list(INITS), default="scratch",
                   help="the student: scratch (MobileNetV3-Small, --weights none) | pretrained (EfficientNet-Lite0, "
                        "--weights imagenet) (default: scratch)")
    p.add_argument("--no_pseudo", action="store_true", help="skip the targeted+pseudo arm, for time (default: off)")
    p.add_argument("--max_label", type=int, default=400, help="images the teacher labels before turn 0 (default: 400)")
    p.add_argument("--relabel_n", type=int, default=300, help="pool items relabeled in the turn, every arm (default: 300)")
    p.add_argument("--epochs", type=int, default=6, help="epochs of every training, turn 0 and each arm (default: 6)")
    p.add_argument("--accuracy", type=float, default=0.83,
                   help="--dataset synthetic: the stand-in teacher's raw accuracy (default: 0.83)")
    add_teacher_args(p)  # the real-image stand-ins
    p.add_argument("--paid_answers", choices=["on", "off"], default="on",
                   help="every arm: train on pool answers the cascade already paid for (default: on)")
    a = p.parse_args()
    runs, secs = over_seeds("flywheel_bench_", lambda tmp, s: one_seed(tmp, s, a), a.seeds)
    kind, images = ("loopback profile", "synthetic") if a.dataset == "synthetic" else (
        f"{a.teacher}, fitted on {a.teacher_fit} held-out images/class",
        "real (5 allowed Fashion-MNIST classes)" if a.dataset == "fashion" else "real (digits)")
    print(f"SIMULATED teacher ({kind}; raw accuracy {ms([r['teacher_acc'] for r in runs], 100)}%), {images} images at "
          f"{a.img_size}px "
          f"({5 * a.per_class} training, {5 * a.test_per_class} test); {a.init} student; "
          f"{a.max_label} labeled, then one "
          f"turn of {a.relabel_n} relabels per arm; {a.epochs} epochs for turn 0 and every arm (--retrain best: continued "
          f"and from scratch, the better on validation kept); "
          f"--paid_answers {a.paid_answers}; no simulated human; {a.seeds} seeds, mean ± std; {secs:.0f}s")
    print(f"{'arm':<16}{'test acc %':>14}{'vs turn 0 (pts)':>17}{'escalation %':>15}{'LLM calls/1k':>15}"
          f"{'labels added':>14}{'labels per $':>14}{'promoted turn 1':>17}")
    t0s = [r["targeted"][0] for r in runs]
    print(f"{'turn 0':<16}{ms([100 * t['accuracy'] for t in t0s]):>14}{'':>17}{ms([100 * t['escalation_rate'] for t in t0s]):>15}"
          f"{ms([t['llm_calls_per_1k'] for t in t0s], nd=0):>15}")
    for arm in arms(a):
        t1 = [r[arm][1] for r in runs]
        gain = [100 * (r[arm][1]["accuracy"] - r[arm][0]["accuracy"]) for r in runs]
        print(f"{arm:<16}{ms([100 * t['accuracy'] for t in t1]):>14}{ms(gain):>17}{ms([100 * t['escalation_rate'] for t in t1]):>15}"
              f"{ms([t['llm_calls_per_1k'] for t in t1], nd=0):>15}{ms([t['new_labels'] for t in t1], nd=0):>14}"
              f"{ms([t['labels_per_usd'] for t in t1], nd=0):>14}{sum(t['promoted'] == 1 for t in t1):>14}/{len(t1)}")
    print_rules([r["rules"] for r in runs])
    nz = [r["noise"] for r in runs]
    print(f"label noise at turn 0 (--measure_noise_cost: the same images, epochs, init and seed on the manifest's "
          f"ground truth, measuring only): student {ms([100 * x['student_accuracy'] for x in nz])}% vs ground-truth "
          f"twin {ms([100 * x['ground_truth_twin_accuracy'] for x in nz])}%, noise cost {ms([x['noise_cost_pts'] for x in nz])} "
          f"pts (goal <= 3)")
    d = [100 * (r["targeted"][1]["accuracy"] - r["random"][1]["accuracy"]) for r in runs]
    if not a.no_pseudo:
        dp = [100 * (r["targeted+pseudo"][1]["accuracy"] - r["targeted"][1]["accuracy"]) for r in runs]
        print(f"pseudo labels (--pseudo_labels on, {ms([r['targeted+pseudo'][1]['pseudo_labels'] for r in runs], nd=0)} "
              f"per turn) - the same targeted turn without them: {ms(dp)} pts test accuracy")
    print(f"targeted - random: {ms(d)} pts test accuracy (goal >= +1); targeted - turn 0: "
          f"{ms([100 * (r['targeted'][1]['accuracy'] - r['targeted'][0]['accuracy']) for r in runs])} pts (goal >= +2)")


if __name__ == "__main__":
    main()

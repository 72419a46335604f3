"""The student on real images: from scratch (MobileNetV3-Small, --weights none) against pretrained
(EfficientNet-Lite0, --weights imagenet, installed with the package), the plain recipe against the default
one, with 300 and 1,500 labels asked, each trained on the stand-in teacher's labels and, with
--measure_noise_cost, on the ground truth of the same images (the noise cost). Runs the real pipeline
(prep at --img_size, label through the loopback server on 127.0.0.1 with the project's default QC, train,
eval); no network.

Real images: Debian's dataset-fashion-mnist restricted to trouser, dress, sandal, sneaker and ankle boot
(the other five classes are never read), or scikit-learn's digits. The teacher is SIMULATED and errs as a
real classifier does: a logistic regression fitted on --teacher_fit held-out images per class answers each
image with its prediction, stating its probability as confidence (--teacher classifier: its errors are per-image
quirks of a pixel model, which a student can learn), or answers with that classifier's confusion rates and
confidences measured on other held-out images, drawn per image (--teacher confusion: class-conditional errors).
Two stand-ins, so that no noise figure rests on one (bench/real_images.py).

    uv run python bench/student_bench.py                                  # fashion, 300 and 1,500 labels, 3 seeds
    uv run python bench/student_bench.py --dataset digits --labels 300 --seeds 3
    uv run python bench/student_bench.py --labels 300 --seeds 1 --arms scratch/augment,pretrained/augment
    uv run python bench/student_bench.py --teacher confusion --labels 1500 --teacher_fit 6 --arms pretrained/augment,scratch/augment
    uv run python bench/student_bench.py --labels 1500 --gold_n 100 --cascade --arms pretrained/augment,pretrained/augment/hard
                                            # label-model weights vs hard labels, and the cascade's calls and accuracy
    uv run python bench/student_bench.py --labels 1500 --gold_n 100 --cascade --arms pretrained/augment,pretrained/augment/valcal
                                            # calibrated on gold pins vs on the validation split of accepted labels
    uv run python bench/student_bench.py --labels 1500 --teacher_fit 6 --arms pretrained/augment,pretrained/augment/reviewed,pretrained/augment/audited
                                            # a SIMULATED person answers the review queue, vs as many random rows

Prints test accuracy on teacher labels and on ground truth (mean ± std over seeds), the noise cost and the
training time per arm, with the labels it trained on (train, validation and calibration rows), how many of them a
SIMULATED person answered, and how many were right.
"""
import argparse
import itertools
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from common import INITS, mean_std, over_seeds  # noqa: E402
from fakes import run_cli  # noqa: E402
from flywheel import quality  # noqa: E402
from flywheel.io import read_csv, read_json  # noqa: E402
from flywheel.student import RECIPES  # noqa: E402
from real_images import add_teacher_args, answer_server, answers_by_sha, make_data, simulated_review  # noqa: E402

QC_CONTROL = " [{} QC]"  # --qc_control NAME: the suffix of an arm trained on the labels of the label step whose held-out model is NAME
OPTIONS = {"hard": ["--label_weights", "none"],  # the control for label-model weights
           "valcal": ["--calibrate_on", "validation"]}  # the control for calibrating on gold pins
# arm options that have a SIMULATED person answer review_labels.csv before training (real_images.simulated_review):
# reviewed, the review queue the label step wrote; halfreviewed, its half with the lowest stated confidence;
# audited, the control, as many rows as the queue holds, drawn at random
REVIEWS = ("reviewed", "halfreviewed", "audited")


def qc_variants(a):
    """The label steps each seed runs: (the --qc_control candidate,) when set, then None (the default, every candidate)."""
    return ([(a.qc_control,)] if a.qc_control else []) + [None]


def one_seed(tmp, a, seed):
    d = tmp / f"seed{seed}"
    answers, teacher_acc, test_acc = make_data(d, a, seed)
    base = d / "base"
    run_cli("--step", "prep", "--dataset", "folder", "--data_root", d / "data", "--out_dir", base, "--img_size", a.img_size,
            "--seed", seed, "--log_level", "WARNING")
    by_sha = answers_by_sha(base, answers)
    truth = {m["path"]: m["label"] for m in read_csv(base / "manifest.csv")}  # to score what each arm trained on
    out = {"teacher_acc": teacher_acc, "teacher_test_acc": test_acc}
    for n in a.labels:
        labs = {}  # QC variant ("": the default) -> its labeled run folder
        for reps in qc_variants(a):
            labs[QC_CONTROL.format(a.qc_control) if reps else ""] = lab = d / f"labels{n}{'_' + reps[0] if reps else ''}"
            shutil.rmtree(lab, ignore_errors=True)
            shutil.copytree(base, lab)
            quality.REPRESENTATIONS, default = (reps or quality.REPRESENTATIONS), quality.REPRESENTATIONS
            try:
                with answer_server(by_sha) as srv:
                    run_cli("--step", "label", "--out_dir", lab, "--data_root", d / "data", "--llm_base_url",
                            srv.url + "/v1", "--llm_model", "sim/classifier", "--max_label", n, "--gold_n", a.gold_n,
                            "--seed", seed, "--log_level", "WARNING")
            finally:
                quality.REPRESENTATIONS = default
            ls = read_json(lab / "label_summary.json")
            rule = ls.get("qc_rule") or {}
            cl = rule.get("student") or (rule.get("report") or {}).get("held_out") or {}  # previous rule | label model
            out[(n, "qc", reps and reps[0])] = {"auroc": cl.get("auroc_by_representation", {}), "rep": cl.get("representation"),
                                               "acc": ls["teacher_accuracy"], "raw": ls["pass1_accuracy"],
                                               "yield": ls["yield"], "calls": ls["calls_per_image"]}
        for (qc, lab), arm in itertools.product(labs.items(), a.arms):
            init, recipe, *opts = arm.split("/")  # options: OPTIONS' flags, REVIEWS' SIMULATED person
            run = d / f"{n}_{arm.replace('/', '_')}{'_controlqc' if qc else ''}"
            shutil.copytree(lab, run)
            person = sum(simulated_review(run, o, seed) for o in opts if o in REVIEWS)
            t0 = time.time()
            run_cli("--step", "train", "--out_dir", run, *INITS[init], "--recipe", recipe,
                    *[f for o in opts for f in OPTIONS.get(o, [])], "--epochs",
                    a.epochs if init == "scratch" else a.pretrained_epochs, "--batch_size", a.batch_size,
                    "--measure_noise_cost", "--seed", seed, "--log_level", "WARNING")
            secs = (time.time() - t0) / 2  # the run trains twice: on teacher labels and on the ground truth
            run_cli("--step", "eval", "--out_dir", run, "--log_level", "WARNING")
            ev = read_json(run / "artifacts" / "eval.json")
            if a.cascade and not qc:
                out[(n, "cascade", arm)] = cascade(run, d, by_sha, seed)
            rows = read_csv(run / "artifacts" / "train_rows.csv")  # what the student trained on: train, val and cal
            out[(n, arm + qc)] = {"acc": ev["accuracy"], "gt": ev["noise_cost"]["ground_truth_twin_accuracy"],
                             "cost": ev["noise_cost"]["noise_cost_pts"], "secs": secs, "person": person,
                             "label_acc": sum(r["label"] == truth[r["path"]] for r in rows) / len(rows), "rows": len(rows)}
            shutil.rmtree(run / "cache", ignore_errors=True)
    return out


def seed_line(out, seed):
    """Print one seed's figures as soon as it is done (a long run stopped early still leaves them); -> out."""
    arms = [(k, r) for k, r in out.items() if isinstance(k, tuple) and len(k) == 2]
    print(f"seed {seed}: teacher {100 * out['teacher_acc']:.1f}% right; " + "; ".join(
        f"{n} {arm}: test {100 * r['acc']:.1f}%, on truth {100 * r['gt']:.1f}%, noise cost {r['cost']:.1f}, "
        f"train {r['secs']:.0f} s" for (n, arm), r in arms), flush=True)
    return out


def cascade(run, d, by_sha, seed):
    """The cascade step on the trained run (test split): LLM calls per escalated item, total calls against calling
    the LLM on every item, and the accuracy of the answers it returns without a person."""
    with answer_server(by_sha) as srv:
        run_cli("--step", "cascade", "--out_dir", run, "--data_root", d / "data", "--llm_base_url", srv.url + "/v1",
                "--llm_model", "sim/classifier", "--seed", seed, "--log_level", "WARNING")
    t = read_json(run / "artifacts" / "cascade.json")["test"]
    esc = round(t["n"] * t["escalation_rate"])
    return {"calls_per_escalated": t["llm_calls"] / esc if esc else 0.0, "calls": t["llm_calls"],
            "llm_only": t["llm_only_calls"], "accuracy": t["accuracy"], "to_person": t["routes"].get("human", 0.0),
            "escalated": t["escalation_rate"], "student_precision": t["route_accuracy"].get("student"),
            "gold": read_json(run / "artifacts" / "cascade.json").get("escalation_value_on_gold") or {}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=["fashion", "digits"], default="fashion", help="real images (default: fashion)")
    p.add_argument("--labels", default="300,1500", help="label budgets, comma-separated (default: 300,1500)")
    p.add_argument("--seeds", type=int, default=3, help="seeds: data draw, teacher and training (default: 3)")
    p.add_argument("--arms", default="scratch/augment,scratch/plain,pretrained/augment,pretrained/lpft,pretrained/plain",
                   help="init/recipe[/option...]; augment is the pipeline's default; options: hard, valcal (OPTIONS), "
                        "reviewed, halfreviewed, audited (REVIEWS) (default: scratch/augment,scratch/plain,"
                        "pretrained/augment,pretrained/lpft,pretrained/plain)")
    p.add_argument("--gold_n", type=int, default=0,
                   help="gold pins for the label step (0: the project's default, no gold) (default: 0)")
    p.add_argument("--qc_control", nargs="?", const="pixels", default=None, choices=quality.REPRESENTATIONS,
                   help="also label with this held-out model only (quality.HELD_OUT; pixels when named without a value), "
                        "the control for the default, and train each arm on those labels too (default: off)")
    p.add_argument("--cascade", action="store_true",
                   help="also run the cascade step on each arm's student and print its calls and accuracy (default: off)")
    p.add_argument("--img_size", type=int, default=96, help="prep's image side in px (default: 96)")
    p.add_argument("--epochs", type=int, default=10, help="epochs from scratch (default: 10)")
    p.add_argument("--pretrained_epochs", type=int, default=4, help="epochs for the pretrained student (default: 4)")
    p.add_argument("--batch_size", type=int, default=64, help="training batch size (default: 64)")
    p.add_argument("--train_per_class", type=int, default=400, help="training images per class (default: 400)")
    p.add_argument("--test_per_class", type=int, default=200, help="test images per class (default: 200)")
    add_teacher_args(p)
    a = p.parse_args(argv)
    a.labels = [int(v) for v in a.labels.split(",")]
    a.arms = [arm for arm in a.arms.split(",") if arm]
    bad = [arm for arm in a.arms if arm.count("/") < 1 or arm.split("/")[0] not in INITS
           or arm.split("/")[1] not in RECIPES or not set(arm.split("/")[2:]) <= set(OPTIONS) | set(REVIEWS)]
    if bad:
        raise SystemExit(f"error: --arms {bad[0]!r}: use init/recipe[/option...] with init in {list(INITS)}, recipe in "
                         f"{list(RECIPES)} and options in {list(OPTIONS) + list(REVIEWS)} (hard: --label_weights none; valcal: "
                         f"--calibrate_on validation; reviewed: a SIMULATED person answers the review queue; "
                         f"halfreviewed: its half with the lowest stated confidence; audited: as many random rows)")
    seeds, secs = over_seeds("student_bench_", lambda tmp, s: seed_line(one_seed(tmp, a, s), s), a.seeds)
    print(f"{a.dataset} ({'5 allowed Fashion-MNIST classes' if a.dataset == 'fashion' else 'digits'}), {a.img_size}px, "
          f"{a.train_per_class}/class training images, {a.test_per_class}/class test; SIMULATED teacher ({a.teacher}): logistic "
          f"regression on {a.teacher_fit} held-out images/class{', its held-out confusions drawn per image' if a.teacher == 'confusion' else ''}, raw accuracy {mean_std([s['teacher_acc'] for s in seeds], 100)}%; "
          f"{a.seeds} seed(s), mean ± std; {secs:.0f}s")
    print(f"{'labels':>6}  {'arm':<34} {'trained on':>11} {'person':>7} {'label acc %':>12} {'test acc %':>12} {'on truth %':>12} "
          f"{'noise cost':>11} {'train s':>9}")
    for n, reps in itertools.product(a.labels, qc_variants(a)):
        q = [s[(n, "qc", reps and reps[0])] for s in seeds]
        print(f"{n:>6}  label step (--gold_n {a.gold_n}{f', held-out model {reps[0]} only: the control' if reps else ''}): accepted accuracy {mean_std([x['acc'] for x in q], 100)}% vs raw "
              f"first answers {mean_std([x['raw'] for x in q], 100)}%, yield {mean_std([x['yield'] for x in q], 100)}%, "
              f"{mean_std([x['calls'] for x in q], nd=2)} calls/image; held-out model AUROC on gold: "
              + ", ".join(f"{rep} {mean_std([x['auroc'].get(rep) for x in q], nd=3)}" for rep in quality.REPRESENTATIONS)
              + f"; chosen: {[x['rep'] for x in q]}")
        for arm in a.arms if a.cascade and not reps else []:
            c = [s[(n, "cascade", arm)] for s in seeds]
            print(f"{n:>6}  cascade ({arm}, test split): escalated {mean_std([x['escalated'] for x in c], 100)}%, "
                  f"student route {mean_std([x['student_precision'] for x in c], 100)}% right, "
                  f"{mean_std([x['calls_per_escalated'] for x in c], nd=2)} LLM calls per escalated item, "
                  f"{mean_std([x['calls'] for x in c], nd=0)} calls vs LLM-only {mean_std([x['llm_only'] for x in c], nd=0)}; "
                  f"accuracy without a person {mean_std([x['accuracy'] for x in c], 100)}% vs the raw teacher on the same "
                  f"items {mean_std([s['teacher_test_acc'] for s in seeds], 100)}%; to a person "
                  f"{mean_std([x['to_person'] for x in c], 100)}%; on gold pins below tau, LLM right "
                  f"{mean_std([x['gold'].get('llm_right') for x in c], 100)}% vs student "
                  f"{mean_std([x['gold'].get('student_right') for x in c], 100)}%")
        for arm in [arm + (QC_CONTROL.format(reps[0]) if reps else "") for arm in a.arms]:  # each arm on these labels
            r = [s[(n, arm)] for s in seeds]
            print(f"{n:>6}  {arm:<34} {mean_std([x['rows'] for x in r], nd=0):>11} {mean_std([x['person'] for x in r], nd=0):>7} "
                  f"{mean_std([x['label_acc'] for x in r], 100):>12} {mean_std([x['acc'] for x in r], 100):>12} "
                  f"{mean_std([x['gt'] for x in r], 100):>12} {mean_std([x['cost'] for x in r]):>11} "
                  f"{mean_std([x['secs'] for x in r], nd=0):>9}")


if __name__ == "__main__":
    main()

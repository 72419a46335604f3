"""A run folder that stays usable: --resume refuses changed training rows, an interrupted train never
leaves a best.pt without its temperature, --step all finishes when no pool is left, outputs honour the
umask."""
import os
import shutil

import pytest

from conftest import TRAIN_FLAGS
from fakes import make_cifar_folder, run_cli
from flywheel.io import read_csv, read_json, write_csv
from flywheel.student import load_checkpoint


def common(d):
    return ["--out_dir", d / "run", "--data_root", d / "data", "--teacher", "oracle"]


def test_resume_refuses_when_training_rows_changed(copy_run):
    d = copy_run
    run_cli("--step", "train", *common(d), *TRAIN_FLAGS, "--epochs", 2)
    review = d / "run" / "review_labels.csv"
    rows = read_csv(review)
    row = next(r for r in rows if r["status"] == "accepted")
    row["label_final"] = next(c for c in ("apple", "pear") if c != row["llm_label"])
    write_csv(review, list(rows[0]), rows)
    with pytest.raises(SystemExit, match=r"training rows changed .*1 relabeled"):
        run_cli("--step", "train", *common(d), *TRAIN_FLAGS, "--epochs", 3, "--resume")


def test_one_edited_label_moves_at_most_one_validation_image(copy_run):
    d = copy_run
    before = {r["path"] for r in read_csv(d / "run" / "artifacts" / "train_rows.csv") if r["split"] == "val"}
    review = d / "run" / "review_labels.csv"
    rows = read_csv(review)
    row = next(r for r in rows if r["status"] == "accepted")
    row["label_final"] = next(c for c in ("apple", "pear") if c != row["llm_label"])
    write_csv(review, list(rows[0]), rows)
    run_cli("--step", "train", *common(d), *TRAIN_FLAGS, "--epochs", 1)
    after = {r["path"] for r in read_csv(d / "run" / "artifacts" / "train_rows.csv") if r["split"] == "val"}
    assert len(before ^ after) <= 2  # at most one image in and one out (the class floor's pick)


def test_gold_pins_calibrate_when_there_are_enough(copy_run):
    """Validation drawn from accepted labels overstates the student (the label step accepts easy images);
    30+ gold pins, a uniform sample with true labels, are kept out of training and calibrate instead."""
    from flywheel.training import MIN_GOLD_VAL
    d = copy_run
    review = d / "run" / "review_labels.csv"
    rows = read_csv(review)
    pins = [r for r in rows if r["status"] == "accepted"][:MIN_GOLD_VAL]
    for r in pins:
        r["status"] = "gold"
    write_csv(review, list(rows[0]), rows)
    run_cli("--step", "train", *common(d), *TRAIN_FLAGS, "--epochs", 1)
    run_cli("--step", "eval", *common(d))
    split = read_csv(d / "run" / "artifacts" / "train_rows.csv")
    assert {r["path"] for r in split if r["split"] == "cal"} == {r["path"] for r in pins}
    assert any(r["split"] == "val" for r in split)  # validation still picks the epoch
    best = load_checkpoint(d / "run" / "artifacts" / "best.pt")
    assert set(best["val_paths"]) == {r["path"] for r in pins} and len(best["val_logits"]) == MIN_GOLD_VAL
    ev = read_json(d / "run" / "artifacts" / "eval.json")
    assert ev["calibrated_on"] == "gold pins" and ev["n_cal"] == MIN_GOLD_VAL
    # what escalation buys, on those pins: at tau 1 all are below it; their "true" labels are the teacher's here
    run_cli("--step", "cascade", *common(d), "--tau", 1.0, "--simulate_human")
    v = read_json(d / "run" / "artifacts" / "cascade.json")["escalation_value_on_gold"]
    assert v["n"] == MIN_GOLD_VAL and v["llm_right"] == 1.0


def test_interrupted_train_leaves_a_usable_run(copy_run, monkeypatch):
    d = copy_run
    art = d / "run" / "artifacts"
    shutil.rmtree(art)  # a first training run
    from flywheel import student as S
    real, n = S.augment, {"batches": 0}

    def dying_augment(x, gen, *part):
        n["batches"] += 1
        if n["batches"] == 10:  # in epoch 2 of 4 (~6 batches each), after epoch 1 saved its best
            raise KeyboardInterrupt
        return real(x, gen, *part)
    monkeypatch.setattr(S, "augment", dying_augment)
    with pytest.raises(SystemExit) as e:
        run_cli("--step", "train", *common(d), *TRAIN_FLAGS)
    assert e.value.code == 130 and (art / "last.pt").exists()
    assert not (art / "best.pt").exists() or "temperature" in load_checkpoint(art / "best.pt")
    with pytest.raises(SystemExit, match=r"--step train --resume"):
        run_cli("--step", "eval", *common(d))
    monkeypatch.setattr(S, "augment", real)
    run_cli("--step", "train", *common(d), *TRAIN_FLAGS, "--resume")
    assert "temperature" in load_checkpoint(art / "best.pt")
    run_cli("--step", "eval", *common(d))
    assert (art / "eval.json").exists()


def test_step_all_finishes_when_every_training_image_is_labeled(tmp_path):
    make_cifar_folder(tmp_path / "data", n_train=12, n_test=4, mix=0.4)
    run_cli("--step", "all", *common(tmp_path), "--simulate_human", "--img_size", 32, *TRAIN_FLAGS, "--epochs", 2)
    run = tmp_path / "run"
    assert read_json(run / "label_summary.json")["requested_images"] == 60  # all of them: no pool left
    c = read_json(run / "artifacts" / "cascade.json")
    assert c["pool"]["n"] == 0 and c["test"]["n"] == 20
    assert [t["turn"] for t in read_json(run / "artifacts" / "flywheel.json")["turns"]] == [0]
    assert (run / "artifacts" / "export.json").exists() and (run / "report.md").exists()


def test_outputs_honour_the_umask(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    make_cifar_folder(tmp_path / "data", n_train=2, n_test=1)
    root = Path(__file__).resolve().parents[1]
    code = ("import os, sys; os.umask(0o022); sys.argv = ['cifar_distill.py', '--step', 'prep', '--data_root', "
            f"{str(tmp_path / 'data')!r}, '--out_dir', {str(tmp_path / 'run')!r}, '--img_size', '16']; "
            "import runpy; runpy.run_path('cifar_distill.py', run_name='__main__')")
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, capture_output=True)
    for name in ("manifest.csv", "prep.json", "classes.json"):
        assert os.stat(tmp_path / "run" / name).st_mode & 0o777 == 0o644, name
    jpg = next((tmp_path / "run" / "images").rglob("*.jpg"))
    assert os.stat(jpg).st_mode & 0o777 == 0o644


def test_noise_cost_is_measured_beside_the_student_and_chooses_nothing(copy_run):
    d = copy_run
    art = d / "run" / "artifacts"
    run_cli("--step", "train", *common(d), *TRAIN_FLAGS, "--measure_noise_cost")
    run_cli("--step", "eval", *common(d))
    e = read_json(art / "eval.json")
    n = e["noise_cost"]
    assert n["student_accuracy"] == e["accuracy"] and 0.0 <= n["ground_truth_twin_accuracy"] <= 1.0
    assert n["noise_cost_pts"] == round(100 * (n["ground_truth_twin_accuracy"] - e["accuracy"]), 2)
    twin = load_checkpoint(art / "noise_cost" / "best_epoch.pt")
    assert twin["config"]["measure_only"] and "temperature" not in twin  # never calibrated, never shipped
    assert load_checkpoint(art / "best.pt")["config"].get("measure_only") is None
    # trained without the flag, the stale twin goes, and eval reports no figure it cannot back
    run_cli("--step", "train", *common(d), *TRAIN_FLAGS)
    run_cli("--step", "eval", *common(d))
    assert not (art / "noise_cost").exists() and read_json(art / "eval.json")["noise_cost"] is None

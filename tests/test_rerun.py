"""Reruns: a step whose inputs and settings are unchanged does nothing and says so; --demo runs the whole
pipeline offline on real images (scikit-learn's digits), and a second run retrains nothing and ships the
same student."""
import logging

from fakes import run_cli
from flywheel.io import read_csv, read_json

# --demo with fewer epochs and labels: the same path, sized for the test suite
DEMO = ["--demo", "--epochs", 1, "--max_label", 200, "--gold_n", 0, "--relabel_n", 30, "--paid_answers", "off"]


def skipped(caplog, step):
    return any(f"step {step}: inputs and settings unchanged" in r.getMessage() for r in caplog.records)


def test_demo_runs_offline_and_a_second_run_retrains_nothing(tmp_path, caplog):
    out = tmp_path / "demo"
    run_cli(*DEMO, "--out_dir", out)
    prep = read_json(out / "prep.json")
    assert prep["classes"][:3] == ["eight", "five", "four"] and sum(prep["counts"]["test"].values()) == 360
    cas = read_json(out / "artifacts" / "cascade.json")
    assert cas["pool"]["n"] > 0 and cas["teacher"]["simulated"] and cas["simulated_human"]  # a pool was left
    fly = read_json(out / "artifacts" / "flywheel.json")
    assert [t["turn"] for t in fly["turns"]] == [0, 1]
    report = (out / "report.md").read_text()
    assert "SIMULATED" in report and "Promoted student: turn" in report
    export = read_json(out / "artifacts" / "export.json")
    students = sorted(out.glob("artifacts/**/best.pt"))
    mtimes = {p: p.stat().st_mtime_ns for p in students}
    ledger = (out / "labels.jsonl").read_bytes()

    caplog.clear()
    with caplog.at_level(logging.INFO):
        run_cli(*DEMO, "--out_dir", out)
    # label may run once more (the cascade appended to the ledger it reads) but asks nothing new
    for step in ("prep", "train", "eval", "flywheel", "export"):
        assert skipped(caplog, step), step
    assert (out / "labels.jsonl").read_bytes() == ledger  # no call paid twice
    assert {p: p.stat().st_mtime_ns for p in sorted(out.glob("artifacts/**/best.pt"))} == mtimes  # nothing retrained
    assert read_json(out / "artifacts" / "export.json") == export  # the same promoted turn, the same export
    assert not any("promoted.json was removed" in r.getMessage() for r in caplog.records)


def test_a_changed_input_or_setting_runs_the_step_again(copy_run, caplog):
    run, data = copy_run / "run", copy_run / "data"
    common = ["--out_dir", run, "--data_root", data, "--teacher", "oracle"]
    with caplog.at_level(logging.INFO):
        run_cli("--step", "eval", *common)  # the copy's stamp names files relative to the run: still fresh
        assert skipped(caplog, "eval")
        caplog.clear()
        (run / "artifacts" / "eval.json").unlink()  # a deleted output
        run_cli("--step", "eval", *common)
        assert not skipped(caplog, "eval") and (run / "artifacts" / "eval.json").exists()
        caplog.clear()
        run_cli("--step", "cascade", *common, "--simulate_human")
        assert skipped(caplog, "cascade")
        caplog.clear()
        run_cli("--step", "cascade", *common, "--simulate_human", "--target_precision", 0.9)  # a setting
        assert not skipped(caplog, "cascade")
        assert read_json(run / "artifacts" / "cascade.json")["target_precision"] == 0.9
        caplog.clear()
        hr = read_csv(run / "human_review.csv")  # a person's answer is an input too
        from flywheel.io import write_csv
        write_csv(run / "human_review.csv", list(hr[0]), hr[:-1])
        run_cli("--step", "cascade", *common, "--simulate_human", "--target_precision", 0.9)
        assert not skipped(caplog, "cascade")
        caplog.clear()
        run_cli("--step", "cascade", *common, "--simulate_human", "--target_precision", 0.9, "--force")
        assert not skipped(caplog, "cascade")


def test_retraining_turn_0_keeps_later_turns_as_candidates(copy_run, caplog):
    """Nothing a later step produced is thrown away: a retrained turn 0 competes with turn 1 on validation."""
    from conftest import TRAIN_FLAGS
    from flywheel.run import Paths, promoted
    run, data = copy_run / "run", copy_run / "data"
    common = ["--out_dir", run, "--data_root", data, "--teacher", "oracle", "--simulate_human"]
    run_cli("--step", "flywheel", *common, *TRAIN_FLAGS, "--relabel_n", 20, "--retrain", "continue")
    turn1 = (run / "artifacts" / "turn_1" / "best.pt").read_bytes()
    with caplog.at_level(logging.WARNING):
        run_cli("--step", "train", *common, *TRAIN_FLAGS[:-2], "--batch_size", 8)  # a changed setting retrains turn 0
    assert (run / "artifacts" / "turn_1" / "best.pt").read_bytes() == turn1
    assert any("stay candidates" in r.getMessage() for r in caplog.records)
    p = promoted(Paths(run))
    assert [c["turn"] for c in p.candidates] == [0, 1]
    assert read_json(run / "artifacts" / "promoted.json")["turn"] == p.turn

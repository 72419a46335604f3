"""Flywheel turns: targeted relabeling grows training only from the pool, human edits win, turns
are recorded and never repeated, no test image enters training."""
import csv

import pytest

from fakes import run_cli
from flywheel.io import read_csv, read_json


def fly(t, *extra):
    run_cli("--step", "flywheel", "--out_dir", t / "run", "--data_root", t / "data", "--teacher", "oracle",
            "--simulate_human", "--relabel_n", 30, "--epochs", 2, "--batch_size", 16, *extra)


def test_flywheel_turn_grows_training_from_pool_only_and_human_edits_win(copy_run):
    run = copy_run / "run"
    manifest = {r["path"]: r for r in read_csv(run / "manifest.csv")}
    pool_before = {r["path"] for r in read_csv(run / "artifacts" / "pool_predictions.csv")}
    # a person answers one pool item in human_review.csv (with a deliberately different label)
    hr = read_csv(run / "human_review.csv")
    target = next(r for r in hr if r["split"] == "pool")
    edited = "pear" if manifest[target["path"]]["label"] != "pear" else "apple"
    target["label_final"], target["source"] = edited, "human"
    with open(run / "human_review.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(hr[0]))
        w.writeheader()
        w.writerows(hr)
    rows0 = read_csv(run / "artifacts" / "train_rows.csv")
    fly(copy_run)
    new = read_csv(run / "flywheel_labels.csv")
    assert 0 < len(new) <= 30 and {r["path"] for r in new} <= pool_before
    assert all(manifest[r["path"]]["split"] == "train" for r in new)
    assert {r["source"] for r in new} <= {"escalation", "human", "simulated_human"}
    got = {r["path"]: r for r in new}
    assert got[target["path"]]["label"] == edited and got[target["path"]]["source"] == "human"
    rows1 = read_csv(run / "artifacts" / "turn_1" / "train_rows.csv")
    assert len(rows1) == len(rows0) + len(new)
    assert {r["path"] for r in rows1} - {r["path"] for r in rows0} == set(got)
    assert [r for r in rows1 if r["split"] == "val"] == [r for r in rows0 if r["split"] == "val"]  # same val split
    f = read_json(run / "artifacts" / "flywheel.json")
    assert [t["turn"] for t in f["turns"]] == [0, 1]
    for t in f["turns"]:
        for k in ("n_labeled", "spend_usd", "accuracy", "macro_f1", "escalation_rate", "cost_per_1k_usd"):
            assert k in t
    assert f["turns"][1]["n_labeled"] == f["turns"][0]["n_labeled"] + len(new)
    for k in ("eval.json", "cascade.json", "best.pt"):
        assert (run / "artifacts" / "turn_1" / k).exists()
    # relabeled items leave the pool the next cascade serves
    pool_after = {r["path"] for r in read_csv(run / "artifacts" / "turn_1" / "pool_predictions.csv")}
    assert not pool_after & set(got) and pool_after == pool_before - set(got)
    # rerunning with the same --turns does nothing new
    fly(copy_run)
    assert [t["turn"] for t in read_json(run / "artifacts" / "flywheel.json")["turns"]] == [0, 1]

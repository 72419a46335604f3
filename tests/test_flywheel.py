"""Flywheel turns: targeted relabeling grows training only from the pool, human edits win, turns
are recorded and never repeated, no test image enters training."""
import csv

import pytest

from fakes import run_cli
from flywheel.io import read_csv, read_json, read_jsonl, write_csv
from flywheel.relabel import turn_evidence
from flywheel.run import Paths, better_key, load_manifest, pool_rows
from flywheel.training import training_rows


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
    turn1 = read_json(run / "artifacts" / "flywheel.json")["turns"][1]
    cascade_paid = [r for r in new if r["source"] == "cascade"]  # already-paid pool answers: no pick spent on them
    assert len(new) == turn1["new_labels"] and turn1["picks_labeled"] == len(new) - turn1["paid_labels"] - turn1["serving_labels"]
    assert 0 < turn1["picks_labeled"] <= 30 and len(cascade_paid) <= turn1["paid_labels"]
    assert {r["path"] for r in new} <= pool_before
    assert all(manifest[r["path"]]["split"] == "train" for r in new)
    assert {r["source"] for r in new} <= {"escalation", "cascade", "human", "simulated_human"}
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


# ----------------------------------------------------------------------------- issue 12: selection, promotion

def test_promotion_follows_validation_never_test():
    from flywheel.run import choose_turn
    turns = [{"turn": 0, "val_acc": 0.80, "accuracy": 0.95}, {"turn": 1, "val_acc": 0.90, "accuracy": 0.50},
             {"turn": 2, "val_acc": 0.90, "accuracy": 0.99}]
    assert choose_turn(turns) == 1  # best validation; the earlier turn on a full tie; test accuracy is ignored
    # an accuracy tie goes to the lower validation NLL, whatever the test says
    for t, v in zip(turns, (0.2, 0.5, 0.4)):
        t["val_nll"] = v
    assert choose_turn(turns) == 2
    turns[1]["val_nll"] = 0.3
    assert choose_turn(turns) == 1


def set_val_acc(ckpt, acc):
    """Make a turn's student score `acc` on validation: the case a promotion test builds on purpose."""
    from flywheel.student import load_checkpoint, save_checkpoint
    ck = load_checkpoint(ckpt)
    ck["best_val_acc"] = acc
    save_checkpoint(ckpt, ck)


def test_export_and_report_ship_the_promoted_student(copy_run):
    from flywheel.run import Paths, promoted
    from flywheel.student import load_student
    run = copy_run / "run"
    fly(copy_run)
    set_val_acc(run / "artifacts" / "turn_1" / "best.pt", 1.01)  # turn 1 wins on validation, by construction
    set_val_acc(run / "artifacts" / "best.pt", 0.5)
    assert promoted(Paths(run)).turn == 1
    run_cli("--step", "export", "--out_dir", run, "--teacher", "oracle")
    e = read_json(run / "artifacts" / "export.json")
    t1 = load_student(run / "artifacts" / "turn_1" / "best.pt")
    assert e["turn"] == 1 and e["temperature"] == t1["temperature"] and e["student"].endswith("turn_1/best.pt")
    run_cli("--step", "report", "--out_dir", run, "--teacher", "oracle")
    report = (run / "report.md").read_text()
    assert "**Promoted student: turn 1**" in report
    # the plots embedded are the promoted turn's own, drawn from its artifacts
    assert "](artifacts/turn_1/confusion_matrix.png)" in report and "](artifacts/turn_1/reliability.png)" in report
    assert "](artifacts/confusion_matrix.png)" not in report
    from flywheel.costs import resolve_inputs, BREAKEVEN_DEFAULTS
    from types import SimpleNamespace
    inp, _ = resolve_inputs(SimpleNamespace(**{**BREAKEVEN_DEFAULTS, "root": str(run), "student_cost_per_1k": 0.0}))
    assert inp["escalation_rate"] == read_json(run / "artifacts" / "turn_1" / "cascade.json")["test"]["escalation_rate"]
    # deleting the record changes nothing: promotion is recomputed from the turns' own checkpoints
    (run / "artifacts" / "promoted.json").unlink(missing_ok=True)
    assert promoted(Paths(run)).turn == 1
    # and turn 0 winning again moves every consumer back
    set_val_acc(run / "artifacts" / "best.pt", 1.02)
    assert promoted(Paths(run)).turn == 0


POOL = [{"path": f"p{i}", "pred": "ab"[i % 2], "margin": str(i / 100)} for i in range(10)]


@pytest.mark.parametrize("strategy,n,esc,answered,first,excluded", [
    ("targeted", 3, {}, (), [], set()),                                   # never asked: a sample
    ("targeted", 50, {}, (), [], set()),                                  # n larger than the pool
    ("targeted", 2, {"p0": {"llm_status": "disagreed"}}, (), [], {"p0"}),  # a rejected answer cannot yield a label
    ("targeted", 2, {"p0": {"llm_status": "disagreed"}}, ("p0",), ["p0"], set()),  # unless a person answered it
    ("margin", 2, {"p0": {"llm_status": "disagreed"}}, (), ["p0", "p1"], set()),  # lowest margin, nothing skipped
])
def test_pick_relabels_edge_cases(strategy, n, esc, answered, first, excluded):
    from flywheel.relabel import pick_relabels
    picked = pick_relabels(POOL, esc, n, strategy, answered)[0]
    assert picked[:len(first)] == first and not set(picked) & excluded and len(set(picked)) == len(picked)
    assert len(picked) == min(n, len(POOL) - len(excluded))


def test_targeted_samples_never_asked_items_whatever_their_margin():
    # the sample is seeded, and neither the student's margins nor its predicted classes move it: on real
    # images both skewed what was added (README, "On real images")
    from flywheel.relabel import pick_relabels
    flipped = [{**r, "margin": str(1 - float(r["margin"])), "pred": "a"} for r in POOL]
    a, b = pick_relabels(POOL, {}, 4, "targeted", seed=3)[0], pick_relabels(flipped, {}, 4, "targeted", seed=3)[0]
    assert a == b and len(set(a)) == 4
    assert a != pick_relabels(POOL, {}, 4, "targeted", seed=4)[0]
    by_seed = {tuple(pick_relabels(POOL, {}, 3, "targeted", seed=s)[0]) for s in range(20)}
    assert len(by_seed) > 10  # not one fixed order


@pytest.mark.parametrize("doubt_below,kept", [(0.5, True), (0.586, True), (0.587, False), (0.7, False)])
def test_targeted_skips_what_the_cascade_contested(doubt_below, kept):
    # p9's accepted LLM label "b": student .2 for it, teacher .85, 2 classes -> .17 / (.17 + .8 * .15) = .586
    from flywheel.relabel import pick_relabels
    esc = {"p9": {"llm_status": "accepted", "llm_label": "b", "student_pred": "a", "student_conf": .8,
                  "student_probs": [.8, .2]}}
    picked, why = pick_relabels(POOL, esc, 10, "targeted", (), 0, ["a", "b"], 0.85, doubt_below=doubt_below)
    assert ("p9" in picked) == kept and why["skipped"] == (not kept)
    assert len(picked) == 10 - (not kept)  # the never-asked nine are picked either way


def test_random_control_is_seeded_and_within_the_pool():
    from flywheel.relabel import pick_relabels
    a, b = pick_relabels(POOL, {}, 4, "random", seed=1)[0], pick_relabels(POOL, {}, 4, "random", seed=1)[0]
    assert a == b and len(set(a)) == 4 and set(a) <= {r["path"] for r in POOL}
    assert pick_relabels([], {}, 4, "targeted")[0] == [] and pick_relabels([], {}, 4, "random")[0] == []


@pytest.mark.parametrize("retrain", ["best", "continue"])
def test_continue_or_scratch_is_decided_on_validation(copy_run, retrain):
    from flywheel.student import load_student
    run = copy_run / "run"
    fly(copy_run, "--retrain", retrain)
    t1 = read_json(run / "artifacts" / "flywheel.json")["turns"][1]["retrain"]
    kept = load_student(run / "artifacts" / "turn_1" / "best.pt")
    if retrain == "best":
        scores = t1["val_acc"]  # {candidate: {val_acc, val_nll}}
        assert set(scores) == {"continue", "scratch"}
        assert better_key(scores[t1["choice"]]) == max(map(better_key, scores.values()))
        assert kept["best_val_acc"] == scores[t1["choice"]]["val_acc"]
        assert not list((run / "artifacts" / "turn_1").glob("_*"))  # the candidates' folders are gone
    else:
        assert t1 == {"choice": "continue"} and kept["init_weights"].endswith("best.pt")


@pytest.mark.parametrize("strategy", ["targeted", "random", "margin"])
def test_no_test_image_enters_selection_training_or_promotion(copy_run, strategy):
    run = copy_run / "run"
    manifest = {r["path"]: r for r in read_csv(run / "manifest.csv")}
    test = {p for p, r in manifest.items() if r["split"] == "test"}
    P = Paths(run)
    from flywheel.relabel import paid_labels, pick_relabels
    ev = turn_evidence(P, P.turn0)
    picked, _ = pick_relabels(ev.pool, ev.escalations, 10_000, strategy, (), 0, ev.classes, ev.teacher_acc)
    assert picked and not set(picked) & test  # everything the strategy would ever pick
    assert not set(paid_labels(ev.pool, ev.escalations, ev.classes, ev.teacher_acc)) & test
    fly(copy_run, "--relabel_strategy", strategy, "--retrain", "continue")
    rows = read_csv(run / "artifacts" / "turn_1" / "train_rows.csv")
    assert not {r["path"] for r in rows} & test
    assert not {r["path"] for r in read_csv(run / "flywheel_labels.csv")} & test
    # promotion compares validation accuracies, and validation is carved from labeled training images
    from flywheel.student import load_student
    val = set(load_student(run / "artifacts" / "turn_1" / "best.pt")["val_paths"])
    assert val and not val & test
    promoted = read_json(run / "artifacts" / "promoted.json")
    assert {c["turn"] for c in promoted["candidates"]} == {0, 1}


def test_pseudo_labels_are_the_students_own_confident_pool_answers(copy_run):
    """--pseudo_labels on: never-asked pool items the student took itself (at or above tau) train on its
    label for that turn only, cost nothing, stay in the pool, and never come from test."""
    import cifar_distill
    run = copy_run / "run"
    # the turn-0 student's pool answers, built on purpose: half the never-escalated items are taken at tau
    esc = {e["path"] for e in read_jsonl(run / "escalations.jsonl")[0]}  # before the turn: its own cascade adds more
    rows = read_csv(run / "artifacts" / "pool_predictions.csv")
    taken = {r["path"] for r in rows[::2] if r["path"] not in esc}
    assert taken
    for r in rows:
        r["escalated"] = "0" if r["path"] in taken else "1"
    write_csv(run / "artifacts" / "pool_predictions.csv", list(rows[0]), rows)
    preds = {r["path"]: r for r in rows}
    fly(copy_run, "--pseudo_labels", "on", "--retrain", "continue")
    new = read_csv(run / "flywheel_labels.csv")
    pseudo = [r for r in new if r["source"] == "pseudo"]
    turn1 = read_json(run / "artifacts" / "flywheel.json")["turns"][1]
    assert pseudo and turn1["pseudo_labels"] == len(pseudo)
    assert {r["path"] for r in pseudo} <= taken  # only items the student took itself
    for r in pseudo:
        assert r["label"] == preds[r["path"]]["pred"] and r["path"] not in esc
    assert len({r["path"] for r in new}) == len(new)  # one label per item: a pick or paid answer wins
    trained = {r["path"] for r in read_csv(run / "artifacts" / "turn_1" / "train_rows.csv")}
    assert {r["path"] for r in pseudo} <= trained
    P = Paths(run)
    manifest = load_manifest(P)
    assert {r["path"] for r in pseudo} <= {r["path"] for r in pool_rows(P, manifest, 1)}  # still in the pool
    cfg = cifar_distill.validate(vars(cifar_distill.build_parser().parse_args(
        ["--out_dir", str(run), "--data_root", str(copy_run / "data"), "--teacher", "oracle"])))
    turn1_rows = {r["path"] for r in training_rows(P, manifest, cfg["classes"], cfg["val_frac"], cfg["seed"], upto_turn=1)[0]}
    later = {r["path"] for r in training_rows(P, manifest, cfg["classes"], cfg["val_frac"], cfg["seed"], upto_turn=2)[0]}
    assert {r["path"] for r in pseudo} <= turn1_rows
    assert not {r["path"] for r in pseudo} & later  # a later turn's student redraws its own


def test_min_new_waits_for_serving_and_says_so(copy_run, caplog):
    """--min_new: no turn until serving has logged that many new settled answers; five are made on purpose here
    (pool images as served uploads, each with an LLM answer the server accepted)."""
    import json
    import logging
    import shutil
    import cifar_distill
    run = copy_run / "run"
    P = Paths(run)
    (run / "production").mkdir()
    served = [r for r in read_csv(run / "manifest.csv") if r["split"] == "train"][:5]
    with open(run / "escalations.jsonl", "a") as f:
        for i, r in enumerate(served):
            shutil.copy(run / r["path"], run / f"production/up{i}.jpg")
            f.write(json.dumps({"split": "production", "path": f"production/up{i}.jpg", "sha256": f"up{i}",
                                "route": "llm", "llm_label": r["label"]}) + "\n")
    with caplog.at_level(logging.INFO):
        run_cli("--step", "flywheel", "--out_dir", run, "--teacher", "oracle", "--turns", 1, "--min_new", 6)
    assert "serving has logged 5 new settled answer(s) since the last turn, fewer than --min_new 6" in caplog.text
    assert not P.turn(1).dir.exists()
    cfg = {"min_new": 5, "classes": read_json(P.classes)}
    assert cifar_distill.waiting_for_serving(cfg, P, load_manifest(P), 1) is False  # five are enough for 5

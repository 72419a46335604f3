"""review_labels.csv as people edit it: saved by a spreadsheet (BOM, CRLF, reordered columns), a lost
column, a row approved as it is, --gold_csv labels that train as source gold, and the count of rows that wait
for a person."""
import csv
import shutil

import pytest

from fakes import KEY, make_cifar_folder, run_cli
from flywheel.io import read_csv
from flywheel.ledger import training_labels
from loopback import LoopbackTeacher

CLASSES = ["apple", "mushroom", "orange", "pear", "sweet_pepper"]


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    """20 images labeled by a loopback teacher that is wrong on a third of its answers, so some rows disagree."""
    import os
    d = tmp_path_factory.mktemp("review")
    make_cifar_folder(d / "data", n_train=12, n_test=2)
    run_cli("--step", "prep", "--data_root", d / "data", "--out_dir", d / "run", "--img_size", 32)
    truth = {r["sha256"]: r["label"] for r in read_csv(d / "run" / "manifest.csv")}
    os.environ["OPENROUTER_API_KEY"] = KEY
    try:
        with LoopbackTeacher(truth, CLASSES, wrong_rate=0.35, seed=4) as srv:
            label(d, srv)
    finally:
        del os.environ["OPENROUTER_API_KEY"]
    return d, truth


def label(d, srv, *extra):
    run_cli("--step", "label", "--out_dir", d / "run", "--data_root", d / "data", "--llm_base_url", srv.url,
            "--max_label", 20, "--max_workers", 4, "--second_pass", "always", *extra)  # disagreements need both passes


@pytest.fixture
def run(labeled, tmp_path, monkeypatch):
    d, truth = labeled
    shutil.copytree(d, tmp_path / "r")
    monkeypatch.setenv("OPENROUTER_API_KEY", KEY)
    return tmp_path / "r", truth


def save_as_spreadsheet(path, rows, columns):
    """What Excel's "CSV UTF-8" writes: a BOM, CRLF line endings, and the columns in the user's order."""
    with open(path, "w", newline="", encoding="utf-8-sig") as f:
        w = csv.DictWriter(f, fieldnames=columns, lineterminator="\r\n", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def test_spreadsheet_save_keeps_every_edit(run):
    d, truth = run
    review = d / "run" / "review_labels.csv"
    rows = read_csv(review)
    bad = next(r for r in rows if r["status"] != "accepted")
    wrong_label = next(c for c in CLASSES if c != bad["llm_label"])
    bad["label_final"] = wrong_label  # a person's correction
    save_as_spreadsheet(review, rows, ["status", "label_final", "confidence", "llm_label", "path"])
    assert review.read_bytes().startswith(b"\xef\xbb\xbf") and b"\r\n" in review.read_bytes()
    with LoopbackTeacher(truth, CLASSES, wrong_rate=0.35, seed=4) as srv:
        label(d, srv)
        assert sum(srv.requests.values()) == 0
    after = {r["path"]: r for r in read_csv(review)}
    assert after[bad["path"]]["label_final"] == wrong_label
    got = {p: (lab, src) for p, lab, src in training_labels(list(after.values()), CLASSES, "llm")}
    assert got[bad["path"]] == (wrong_label, "human")


@pytest.mark.parametrize("drop", ["llm_label", "label_final", "path", "status"])
def test_a_lost_column_fails_naming_it(run, drop):
    d, truth = run
    review = d / "run" / "review_labels.csv"
    rows = read_csv(review)
    save_as_spreadsheet(review, rows, [c for c in rows[0] if c != drop])
    with pytest.raises(SystemExit, match=f"no column '{drop}'"):
        run_cli("--step", "train", "--out_dir", d / "run", "--data_root", d / "data", "--weights", "none", "--epochs", 1)
    with LoopbackTeacher(truth, CLASSES) as srv, pytest.raises(SystemExit, match=f"no column '{drop}'"):
        label(d, srv)


def test_approving_a_disagreed_row_as_it_is(run):
    d, truth = run
    review = d / "run" / "review_labels.csv"
    rows = read_csv(review)
    row = next(r for r in rows if r["status"] in ("disagreed", "low_confidence"))
    assert row["path"] not in {p for p, _, _ in training_labels(rows, CLASSES, "llm")}
    row["status"] = "Approved"  # what the README says to type
    save_as_spreadsheet(review, rows, list(rows[0]))
    with LoopbackTeacher(truth, CLASSES, wrong_rate=0.35, seed=4) as srv:
        label(d, srv)  # a rerun rewrites the file from the ledger: the approval must survive it
    after = {r["path"]: r for r in read_csv(review)}
    assert after[row["path"]]["status"] == "approved"
    got = {p: (lab, src) for p, lab, src in training_labels(list(after.values()), CLASSES, "llm")}
    assert got[row["path"]] == (row["label_final"], "human")


def test_gold_csv_labels_train_as_source_gold(run):
    d, truth = run
    manifest = read_csv(d / "run" / "manifest.csv")
    train = [r for r in manifest if r["split"] == "train"][:4]
    gold = d / "gold.csv"
    with open(gold, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label"])
        w.writeheader()
        w.writerows({"path": r["path"], "label": r["label"]} for r in train)
    with LoopbackTeacher(truth, CLASSES, wrong_rate=0.35, seed=4) as srv:
        label(d, srv, "--gold_csv", gold, "--min_gold_acc", 0, "--max_label", 50)
    rows = {r["path"]: r for r in read_csv(d / "run" / "review_labels.csv")}
    assert all(rows[r["path"]]["status"] == "gold" and rows[r["path"]]["label_final"] == r["label"] for r in train)
    got = {p: (lab, src) for p, lab, src in training_labels(list(rows.values()), CLASSES, "llm")}
    assert all(got[r["path"]] == (r["label"], "gold") for r in train)
    run_cli("--step", "train", "--out_dir", d / "run", "--data_root", d / "data", "--weights", "none",
            "--epochs", 1, "--batch_size", 8)
    sources = {r["path"]: r["source"] for r in read_csv(d / "run" / "artifacts" / "train_rows.csv")}
    assert all(sources[r["path"]] == "gold" for r in train)


def test_the_label_step_says_how_many_rows_wait_for_a_person(run, caplog):
    d, truth = run
    review = d / "run" / "review_labels.csv"
    rows = read_csv(review)
    queue = [r for r in rows if r["status"] != "accepted"]
    assert queue, "the fixture's teacher must leave rows for review"
    with LoopbackTeacher(truth, CLASSES, wrong_rate=0.35, seed=4) as srv, caplog.at_level("INFO"):
        label(d, srv)
    assert f"{len(queue)} row(s) of {review} wait for a person" in caplog.text
    right = {m["path"]: m["label"] for m in read_csv(d / "run" / "manifest.csv")}
    for r in queue[1:]:  # a person answers all but one
        r["label_final"], r["status"] = right[r["path"]], "approved"
    save_as_spreadsheet(review, rows, list(rows[0]))
    caplog.clear()
    with LoopbackTeacher(truth, CLASSES, wrong_rate=0.35, seed=4) as srv, caplog.at_level("INFO"):
        label(d, srv)
    assert f"1 row(s) of {review} wait for a person" in caplog.text

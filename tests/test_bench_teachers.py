"""The student bench's stand-ins (SIMULATED): the confusion teacher answers each class with the classifier's
held-out confusion rates and draws its confidence from the classifier's right or wrong answers; the simulated
person answers review rows from the ground truth."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from flywheel.io import read_csv, write_csv  # noqa: E402
from flywheel.ledger import training_labels  # noqa: E402
from real_images import ConfusionTeacher, simulated_review  # noqa: E402


def two_classes(n):
    """Two classes a classifier separates perfectly: dark (a) and bright (b) 4x4 images, uint8 [2n, 4, 4]."""
    return np.concatenate([np.full((n, 4, 4), 10, np.uint8), np.full((n, 4, 4), 240, np.uint8)]), np.array(["a"] * n + ["b"] * n)


def test_confusion_rates_come_from_held_out_answers():
    fit_x, fit_y = two_classes(5)
    held_x, held_y = two_classes(8)
    held_y = held_y.copy()
    held_y[:2] = "b"  # 2 of the 8 dark images are truly b: the classifier answers a for all 8 dark ones
    t = ConfusionTeacher(fit_x, fit_y, held_x, held_y, seed=0)
    # true b: 8 bright (answered b) + 2 dark (answered a) -> P(a | b) = 2/10; true a: 6 dark, all answered a
    assert t.classes == ["a", "b"]
    np.testing.assert_allclose(t.confusion, [[1.0, 0.0], [0.2, 0.8]])
    assert len(t.conf_right) == 14 and len(t.conf_wrong) == 2


def test_answers_follow_the_rates_and_draw_confidence_by_correctness():
    fit_x, fit_y = two_classes(5)
    held_x, held_y = two_classes(8)
    held_y = held_y.copy()
    held_y[:2] = "b"
    t = ConfusionTeacher(fit_x, fit_y, held_x, held_y, seed=1)
    ans = t.answer(["b"] * 2000 + ["a"] * 100)
    wrong = [c for lab, c in ans[:2000] if lab == "a"]
    assert 0.17 < len(wrong) / 2000 < 0.23  # P(a | b) = 0.2; binomial sd 0.009
    assert all(lab == "a" for lab, _ in ans[2000:])  # P(b | a) = 0
    assert set(wrong) <= set(t.conf_wrong.tolist())
    assert {c for lab, c in ans if lab == "b"} <= set(t.conf_right.tolist())


def review_run(folder):
    """A labeled run folder: 6 images of truth a; the teacher said b for 3, and the label step accepted 4 rows."""
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(folder / "manifest.csv", ["path", "label"], [{"path": f"{i}.jpg", "label": "a"} for i in range(6)])
    said = ["a", "b", "b", "a", "a", "b"]
    status = ["accepted", "accepted", "low_confidence", "accepted", "disagreed", "accepted"]
    write_csv(folder / "review_labels.csv", ["path", "llm_label", "label_final", "status"],
              [{"path": f"{i}.jpg", "llm_label": s, "label_final": s, "status": st}  # as the label step writes them
               for i, (s, st) in enumerate(zip(said, status))])
    return folder


def test_the_simulated_person_answers_the_review_queue_from_truth(tmp_path):
    run = review_run(tmp_path)
    assert simulated_review(run, "reviewed", seed=0) == 2  # rows 2 and 4, the two not accepted
    labels = training_labels(read_csv(run / "review_labels.csv"), ["a", "b"], "llm")
    # accepted rows keep the teacher's answer (rows 1 and 5 stay wrong); the queue trains as a person's rows
    assert [(x.path, x.label, x.source) for x in labels] == [
        ("0.jpg", "a", "llm"), ("1.jpg", "b", "llm"), ("2.jpg", "a", "human"), ("3.jpg", "a", "llm"),
        ("4.jpg", "a", "human"), ("5.jpg", "b", "llm")]


def test_a_person_short_of_time_answers_the_least_confident_half_of_the_queue(tmp_path):
    run = review_run(tmp_path)
    rows = read_csv(run / "review_labels.csv")
    for r, c in zip(rows, ["0.9", "0.9", "0.8", "0.9", "0.3", "0.9"]):
        r["confidence"] = c
    write_csv(run / "review_labels.csv", list(rows[0]), rows)
    assert simulated_review(run, "halfreviewed", seed=0) == 1
    answered = [r["path"] for r in read_csv(run / "review_labels.csv") if r["status"] == "approved"]
    assert answered == ["4.jpg"]  # of the queue (rows 2 and 4), the one stated at 0.3


def test_the_audit_control_answers_as_many_rows_drawn_from_the_whole_sample(tmp_path):
    answered = set()
    for seed in range(8):
        run = review_run(tmp_path / str(seed))
        assert simulated_review(run, "audited", seed=seed) == 2  # as many as the queue holds
        rows = read_csv(run / "review_labels.csv")
        mine = {r["path"] for r in rows if r["status"] == "approved"}
        assert len(mine) == 2 and all(r["label_final"] == "a" for r in rows if r["path"] in mine)
        answered |= mine
    assert answered & {"0.jpg", "1.jpg", "3.jpg", "5.jpg"}  # accepted rows are drawn too, not only the queue

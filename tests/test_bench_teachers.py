"""The student bench's stand-in teachers (SIMULATED): the confusion teacher answers each class with the
classifier's held-out confusion rates and draws its confidence from the classifier's right or wrong answers."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from real_images import ConfusionTeacher  # noqa: E402


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

"""Calibration and metric maths against hand-computed cases and sklearn."""
import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from flywheel import calibrate as C


def test_temperature_lowers_nll_on_overconfident_logits():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 2000)
    logits = rng.normal(0, 1, (2000, 4))
    logits[np.arange(2000), y] += 1.0
    over = logits * 4  # same ranking, 4x too confident
    T = C.fit_temperature(over, y)
    assert T > 1.5 and C.nll(over, y, T) < C.nll(over, y, 1.0)


def test_temperature_recovers_known_T():
    # labels sampled from softmax(z / 2.5): the NLL-optimal temperature for logits z is 2.5
    rng = np.random.default_rng(1)
    z = rng.normal(0, 3, (20000, 5))
    p = C.softmax(z, 2.5)
    y = np.array([rng.choice(5, p=row) for row in p])
    assert C.fit_temperature(z, y) == pytest.approx(2.5, rel=0.05)


def test_nll_and_softmax_hand_values():
    z = np.array([[math.log(3), 0.0]])
    assert C.softmax(z).tolist()[0] == pytest.approx([0.75, 0.25])
    assert C.nll(z, np.array([1])) == pytest.approx(-math.log(0.25))
    assert C.nll(z, np.array([0]), T=1e9) == pytest.approx(math.log(2))


@pytest.mark.parametrize("conf,correct,bins,expected", [
    ([0.9, 0.9, 0.6, 0.6], [1, 0, 1, 1], 10, 0.4),          # bins 0.9: |0.5-0.9|, 0.6: |1-0.6|, each weight 1/2
    ([1.0, 1.0], [1, 1], 15, 0.0),                           # perfectly calibrated at the top edge
    ([0.2, 0.4], [0, 0], 15, 0.3),                           # two bins: (0.2 + 0.4) / 2
    ([0.7, 0.8], [1, 0], 1, 0.25),                           # one bin: mean conf 0.75 vs acc 0.5
])
def test_ece_hand_computed(conf, correct, bins, expected):
    assert C.ece(np.array(conf), np.array(correct), bins) == pytest.approx(expected)


def test_ece_bin_edges_are_right_closed():
    # 1/15 sits on an edge: it belongs to bin 0 (lo, hi], not bin 1
    b = C.reliability_bins(np.array([1 / 15, 1 / 15 + 1e-9]), np.array([1, 1]))
    assert [x["count"] for x in b] == [1, 1] and b[0]["hi"] == pytest.approx(1 / 15)


@pytest.mark.parametrize("target,tau", [(0.75, 0.7), (1.0, 0.8), (0.6, 0.6), (0.5, 0.6)])
def test_threshold_for_precision(target, tau):
    conf = np.array([0.95, 0.9, 0.8, 0.7, 0.6])
    correct = np.array([1, 1, 1, 0, 0])
    # precisions of accepting the top k: 1, 1, 1, 0.75, 0.6
    t = C.threshold_for_precision(conf, correct, target)
    assert t == tau
    assert C.coverage_precision(conf, correct, t)[1] >= target


def test_threshold_unreachable_accepts_nothing():
    t = C.threshold_for_precision(np.array([0.9, 0.8]), np.array([0, 0]), 0.95)
    assert t > 1.0 and C.coverage_precision(np.array([0.9, 0.8]), np.array([0, 0]), t) == (0.0, None)


def test_threshold_respects_ties():
    # two items tie at 0.8, one wrong: tau=0.8 accepts both (precision 2/3), so 0.9 is the answer at 0.9
    conf, correct = np.array([0.9, 0.8, 0.8]), np.array([1, 1, 0])
    assert C.threshold_for_precision(conf, correct, 0.9) == 0.9


@pytest.mark.parametrize("budget,tau,escalated", [(0.5, 0.8, 2), (0.0, 0.6, 0), (0.25, 0.7, 1), (1.0, 1.0 + 1e-9, 4)])
def test_threshold_for_budget(budget, tau, escalated):
    conf = np.array([0.9, 0.8, 0.7, 0.6])
    t = C.threshold_for_budget(conf, budget)
    assert t == pytest.approx(tau) and int((conf < t).sum()) == escalated


def test_coverage_example():
    cov, prec = C.coverage_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 1, 0, 1]), 0.7)
    assert (cov, prec) == (0.75, pytest.approx(2 / 3))


def test_metrics_agree_with_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 5, 300)
    pred = np.where(rng.random(300) < 0.7, y, rng.integers(0, 5, 300))
    pred[pred == 4] = 3  # class 4 never predicted: precision 0 by convention
    classes = list("abcde")
    m = C.classification_metrics(y, pred, classes)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", labels=range(5), zero_division=0))
    assert m["confusion_matrix"] == confusion_matrix(y, pred, labels=range(5)).tolist()
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=range(5), zero_division=0)
    for i, c in enumerate(classes):
        assert [m["report"][c][k] for k in ("precision", "recall", "f1", "support")] == pytest.approx([p[i], r[i], f[i], s[i]])


def test_margin():
    assert C.margin(np.array([[0.5, 0.5, 0.0], [0.9, 0.05, 0.05]])).tolist() == pytest.approx([0.0, 0.85])

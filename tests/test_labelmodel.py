"""The label model: its fit on hand-computed gold cases, the threshold (target met at the lower bound, or the
min_yield fallback when it cannot be), cross-validated calibration, and one call per image by default."""
import math

import numpy as np
import pytest

from flywheel import labelmodel as L
from flywheel.labeling import QC, Budget, label_items
from flywheel.ledger import Ledger


def test_fit_map_hand_computed_rates():
    # a binary feature and an intercept, no prior: the saturated fit is each group's rate, 3/10 and 9/10
    x = np.array([[1.0, 0.0]] * 10 + [[1.0, 1.0]] * 10)
    y = np.array([1] * 3 + [0] * 7 + [1] * 9 + [0] * 1)
    b = L.fit_map(x, y, np.zeros(2), np.zeros(2))
    assert L.sigmoid(b[0]) == pytest.approx(0.3, abs=1e-6)
    assert L.sigmoid(b[0] + b[1]) == pytest.approx(0.9, abs=1e-6)
    # shrinkage: 8 of 10 right under a prior N(0, 1/lam) on the logit; lam = 0.5 / logit(0.75) puts the optimum
    # of 8 - 10 sigmoid(b) - lam b = 0 exactly at 0.75 (8 - 7.5 = 0.5 = lam logit(0.75))
    lam = 0.5 / math.log(3)
    assert L.sigmoid(L.fit_map(np.ones((10, 1)), y[10:18].tolist() + [0, 0], np.zeros(1), np.array([lam]))[0]) == \
        pytest.approx(0.75, abs=1e-6)


def pins(right_high=27, n_high=30, right_low=3, n_low=10):
    """Gold pins: n_high first answers stated at 0.95 (right_high right), n_low at 0.6; a second answer agrees
    exactly when the first was right."""
    out = []
    for conf, n, k in [(0.95, n_high, right_high), (0.6, n_low, right_low)]:
        out += [(L.Evidence("a" if i % 2 else "b", conf, agree=i < k), i < k) for i in range(n)]
    return out


def test_without_gold_the_model_is_the_stated_priors():
    m = L.fit_model([], [], ["a", "b"], ["confidence"])
    assert m.weights["confidence"] == L.PRIOR_MEAN["confidence"] and m.weights["class:a"] == 0.0
    assert m.p_right(L.Evidence("a", 0.9)) == pytest.approx(L.sigmoid(0.7 * math.log(9)))


def test_target_reached_at_the_lower_bound():
    p = pins()
    lm = L.fit_label_model(p, [e for e, _ in p], ["a", "b"], target=0.7, min_yield=0.5, share=0.0)
    # accepting all 40 is 30/40 right (Wilson lower 0.60 < 0.7); the 0.95 group alone is 27/30 (lower 0.74)
    assert lm.mode == "target"
    assert lm.p1(L.Evidence("a", 0.95)) >= lm.threshold > lm.p1(L.Evidence("a", 0.6))
    assert lm.estimate["accepted"] == 30 and lm.estimate["accuracy"] == 0.9


def test_infeasible_target_falls_back_to_min_yield_not_to_asking_twice():
    p = pins()
    lm = L.fit_label_model(p, [e for e, _ in p], ["a", "b"], target=0.85, min_yield=0.75, share=0.0)
    # no threshold reaches 0.85 at the lower bound (27/30: 0.74); the best accuracy keeping 75% accepted is the
    # 0.95 group alone, with no second call for anyone
    assert lm.mode == "min_yield" and "best accepted accuracy" in lm.why
    assert lm.estimate == {"accepted": 30, "accuracy": 0.9, "ci95": [0.7438, 0.9654], "yield": 0.75}
    assert lm.report["asked_share_est"] == 0.0
    # and a minimum yield the 0.95 group cannot meet accepts everyone
    lm = L.fit_label_model(p, [e for e, _ in p], ["a", "b"], target=0.85, min_yield=0.9, share=0.0)
    assert lm.mode == "min_yield" and lm.estimate["yield"] == 1.0


def test_second_answers_only_where_they_can_change_the_decision_and_within_budget():
    p = pins()
    lm = L.fit_label_model(p, [e for e, _ in p], ["a", "b"], target=0.85, min_yield=0.75, share=0.25)
    # agreement is decisive on these pins, so the 0.6 group is where a second answer can lift a label over t
    low = L.Evidence("a", 0.6)
    assert lm.p1(low) < lm.threshold <= lm.p_if_agree(low) and lm.second_helps(low)
    assert not lm.second_helps(L.Evidence("a", 0.95))  # accepted alone
    assert lm.report["asked_share_est"] <= 0.25


def test_report_says_which_signals_separated_and_how_calibrated():
    p = pins()
    lm = L.fit_label_model(p, [e for e, _ in p], ["a", "b"], target=0.85, min_yield=0.75)
    r = lm.report
    assert r["signals"] == ["confidence"] and set(r["auroc_on_gold"]) == {"confidence", "agree", "label_model_cv"}
    assert r["auroc_on_gold"]["agree"] == 1.0  # agreement is right-ness itself on these pins
    assert set(r["calibration_cv"]["first"]) == {"brier", "ece", "mean_p", "rate"}
    assert L.LabelModel.from_json(lm.to_json()).threshold == lm.threshold


def test_logprob_is_a_signal_when_present():
    ev = [L.Evidence("a", 0.95, logprob=math.log(0.99 if i % 4 else 0.2)) for i in range(40)]
    lm = L.fit_label_model([(e, bool(i % 4)) for i, e in enumerate(ev)], ev, ["a"], target=0.85, min_yield=0.7)
    assert "logprob" in lm.first.signals and lm.report["auroc_on_gold"]["logprob"] == 1.0
    assert lm.p1(ev[1]) > 0.9 > 0.5 > lm.p1(ev[0])


def test_one_call_per_image_by_default(tmp_path):
    from fakes import solid_jpeg_items
    from loopback import LoopbackTeacher
    from flywheel.teacher import LLMTeacher
    items, truth = solid_jpeg_items(tmp_path, 6)
    qc = QC(["apple", "pear"])  # the default: model mode, stated priors before any gold (threshold 0.7)
    assert qc.second_pass == "model"
    with LoopbackTeacher({**truth}, ["apple", "pear"], confidence=0.93) as srv, Ledger(tmp_path / "l.jsonl") as led, \
            LLMTeacher(srv.url, "m", "k", ["apple", "pear"]) as t:
        out = label_items(items, t, led, qc, Budget(1.0, 0.0, 0.001), "cascade", max_workers=2)
        assert sum(srv.requests.values()) == 6  # P(right) at 0.93 stated is 0.86 >= 0.7: accepted on one call
        assert {v.status for v in out.values()} == {"accepted"}
        srv.confidence = 0.7  # now P(right) 0.64, in [0.6, 0.7), and 0.83 were a second answer to agree: one more each
        items2, truth2 = solid_jpeg_items(tmp_path / "b", 3, offset=50)
        srv.truth.update(truth2)
        out = label_items(items2, t, led, qc, Budget(1.0, 0.0, 0.001), "cascade", max_workers=2)
        assert sum(srv.requests.values()) == 6 + 2 * 3 and {v.status for v in out.values()} == {"accepted"}


def test_the_cascade_asks_once_unless_a_second_answer_can_change_the_decision(tiny_run, tmp_path):
    """Every item escalates (--tau 1); each gets a second call exactly when the label model says one can change
    the decision, so the cascade never asks everything twice."""
    import shutil

    from fakes import run_cli
    from flywheel.io import read_jsonl
    from flywheel.labelmodel import evidence_of, prior_model
    shutil.copytree(tiny_run, tmp_path / "t")
    run = tmp_path / "t" / "run"
    run_cli("--step", "cascade", "--out_dir", run, "--data_root", tmp_path / "t" / "data", "--teacher", "oracle",
            "--tau", 1.0)
    recs = [r for r in read_jsonl(run / "escalations.jsonl")[0] if r["tau"] == 1.0]
    lm = prior_model(sorted({r["student_pred"] for r in recs} | {a["label"] for r in recs for a in r["llm_answers"]}))
    assert len(recs) > 20
    for r in recs:
        first = next(a for a in r["llm_answers"] if a["pass"] == 1)
        assert len(r["llm_answers"]) == 1 + lm.second_helps(evidence_of(first)), r
    assert sum(len(r["llm_answers"]) for r in recs) < 2 * len(recs)

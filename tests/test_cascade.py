"""Cascade: routes add up, tau reaches the target on validation, ledger answers are reused (the
loopback server counts every request), escalations.jsonl resumes after a kill."""
import json
import shutil

import pytest

from conftest import TINY, TRAIN_FLAGS
from fakes import make_cifar_folder, run_cli
from flywheel.calibrate import coverage_precision, softmax
from flywheel.io import read_csv, read_json
from flywheel.student import load_checkpoint
from loopback import LoopbackTeacher

KEY = "sk-test-cascade"
CLASSES = ["apple", "mushroom", "orange", "pear", "sweet_pepper"]


def escalations(run):
    return [json.loads(line) for line in (run / "escalations.jsonl").read_text().splitlines() if line.strip()]


def test_routes_add_up_and_match_the_log(tiny_run):
    run = tiny_run / "run"
    c = read_json(run / "artifacts" / "cascade.json")
    esc = escalations(run)
    for split in ("test", "pool"):
        s = c[split]
        assert sum(s["routes"].values()) == pytest.approx(1.0)
        n_esc = round((s["routes"]["llm"] + s["routes"]["human"]) * s["n"])
        recs = [e for e in esc if e["split"] == split and e["student_id"] == c["student_id"]]
        assert len(recs) == n_esc and all(e["student_conf"] < c["tau"] for e in recs)
        assert s["llm_calls"] == sum(len(e["llm_answers"]) for e in recs)
        assert s["cost_usd"] == pytest.approx(sum(e["llm_cost_usd"] for e in recs))
        assert s["llm_only_calls"] == s["n"]  # the one LLM-only baseline: one call per item
        assert s["human_pending"] == 0  # SIMULATED human answered them all
    assert c["test"]["n"] == TINY["n_test"] * 5
    assert c["pool"]["n"] == TINY["n_train"] * 5 - 120  # the pool is what the label step did not label
    for e in esc:
        assert set(e) >= {"student_probs", "route", "llm_answers", "llm_cost_usd", "human_label", "ts"}
        if e["route"] == "human":
            assert e["human_source"] == "simulated_human"
    assert c["sweep"] and all(0 <= s["escalation_rate"] <= 1 for s in c["sweep"])
    rates = [s["escalation_rate"] for s in c["sweep"]]
    assert rates == sorted(rates)  # a higher tau never escalates less


def test_tau_reaches_target_precision_on_validation(tiny_run):
    run = tiny_run / "run"
    c = read_json(run / "artifacts" / "cascade.json")
    best = load_checkpoint(run / "artifacts" / "best.pt")
    p = softmax(best["val_logits"], best["temperature"])
    cov, prec = coverage_precision(p.max(1), p.argmax(1) == best["val_labels"], c["tau"])
    assert c["tau"] <= 1.0, "the tiny student should reach 0.95 precision on part of validation"
    assert prec >= 0.95 and cov == pytest.approx(c["val_coverage"])
    # and it is the lowest such tau: the next lower validation confidence breaks the target
    lower = sorted(x for x in p.max(1) if x < c["tau"])
    if lower:
        assert coverage_precision(p.max(1), p.argmax(1) == best["val_labels"], lower[-1])[1] < 0.95


def test_escalation_budget_caps_the_rate(copy_run):
    run = copy_run / "run"
    run_cli("--step", "cascade", "--out_dir", run, "--data_root", copy_run / "data", "--teacher", "oracle",
            "--simulate_human", "--escalation_budget", 0.2)
    c = read_json(run / "artifacts" / "cascade.json")
    best = load_checkpoint(run / "artifacts" / "best.pt")
    p = softmax(best["val_logits"], best["temperature"])
    assert (p.max(1) < c["tau"]).mean() <= 0.2 and c["tau_rule"].startswith("escalation_budget")


@pytest.fixture(scope="module")
def llm_run(tmp_path_factory):
    """A tiny run labeled by the loopback LLM server (a real HTTP teacher), trained, not yet cascaded."""
    d = tmp_path_factory.mktemp("llmrun")
    make_cifar_folder(d / "data", **TINY)
    run_cli("--step", "prep", "--out_dir", d / "run", "--data_root", d / "data", "--img_size", 32)
    truth = {r["sha256"]: r["label"] for r in read_csv(d / "run" / "manifest.csv")}
    import os
    os.environ["OPENROUTER_API_KEY"] = KEY
    try:
        with LoopbackTeacher(truth, CLASSES, wrong_rate=0.15, seed=1) as srv:
            run_cli("--step", "label", "--out_dir", d / "run", "--data_root", d / "data", "--llm_base_url", srv.url,
                    "--max_label", 120, "--max_workers", 4)
    finally:
        del os.environ["OPENROUTER_API_KEY"]
    run_cli("--step", "train", "--out_dir", d / "run", "--data_root", d / "data", *TRAIN_FLAGS)
    return d, truth


def cascade_llm(d, srv, *extra):
    """The cascade with every item escalated on purpose (--escalation_budget 1: tau above any confidence), so
    what these tests check does not hang on how confident a tiny trained student happens to be."""
    return run_cli("--step", "cascade", "--out_dir", d / "run", "--data_root", d / "data", "--llm_base_url", srv.url,
                   "--max_workers", 4, "--escalation_budget", 1, *extra)


def test_cascade_reuses_ledger_and_resumes_after_kill(llm_run, tmp_path, monkeypatch):
    src, truth = llm_run
    d = tmp_path / "c"
    shutil.copytree(src, d)
    monkeypatch.setenv("OPENROUTER_API_KEY", KEY)
    from flywheel import cascade as Cmod
    real_append = Cmod.EscalationLog.append
    calls = {"n": 0}

    def dying_append(self, rec):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real_append(self, rec)
    with LoopbackTeacher(truth, CLASSES, wrong_rate=0.15, seed=2, latency_s=0.02) as srv:
        monkeypatch.setattr(Cmod.EscalationLog, "append", dying_append)
        with pytest.raises(SystemExit) as e:
            cascade_llm(d, srv)
        assert e.value.code == 130
        monkeypatch.setattr(Cmod.EscalationLog, "append", real_append)
        n_logged = len(escalations(d / "run"))
        assert n_logged == 2
        before = dict(srv.requests)
        # Ctrl-C stops spending: queued images are dropped, only calls in flight land. At most the 3 items
        # that finished plus a window of 2 x 4 workers were ever sent, far fewer than the escalations.
        asked = {sha for sha, _ in before}
        assert len(asked) <= 3 + 2 * 4, len(asked)
        cascade_llm(d, srv)
        assert len({sha for sha, _ in srv.requests}) > len(asked)  # the resume asked what the stop left
        # every (image, pass) asked at most once over the kill, the resume and a third run
        cascade_llm(d, srv)
        assert max(srv.requests.values()) == 1, [k for k, v in srv.requests.items() if v > 1]
        assert all(srv.requests[k] == v for k, v in before.items())
    run = d / "run"
    c = read_json(run / "artifacts" / "cascade.json")
    esc = escalations(run)
    keys = [(e["student_id"], e["split"], e["path"]) for e in esc]
    assert len(keys) == len(set(keys))  # resumed, not re-logged
    for split in ("test", "pool"):
        n_esc = round((c[split]["routes"]["llm"] + c[split]["routes"]["human"]) * c[split]["n"])
        assert sum(e["split"] == split for e in esc) == n_esc
    # no key in anything the cascade wrote
    for p in run.rglob("*"):
        if p.is_file():
            assert KEY.encode() not in p.read_bytes()
    # without --simulate_human, human items wait in human_review.csv with an empty label_final
    hr = read_csv(run / "human_review.csv")
    assert list(hr[0]) == ["path", "split", "student_label", "student_conf", "llm_answers", "llm_status",
                           "label_final", "source", "turn"]
    assert all(r["label_final"] == "" for r in hr)
    assert c["test"]["human_pending"] == sum(r["split"] == "test" for r in hr)


def test_cascade_budget_stop_then_higher_budget_asks_the_rest(llm_run, tmp_path, monkeypatch):
    src, truth = llm_run
    d = tmp_path / "b"
    shutil.copytree(src, d)
    monkeypatch.setenv("OPENROUTER_API_KEY", KEY)
    spent = read_json(d / "run" / "label_summary.json")["cost_usd"]
    with LoopbackTeacher(truth, CLASSES, wrong_rate=0.15, seed=2) as srv:
        cascade_llm(d, srv, "--max_usd", spent + 0.00051, "--usd_per_call", 0.0001)
        assert read_json(d / "run" / "artifacts" / "cascade.json")["budget_stopped"]
        n_first = sum(srv.requests.values())
        assert 0 < n_first <= 5
        cascade_llm(d, srv, "--max_usd", 5)
        assert max(srv.requests.values()) == 1  # the first run's answers were reused, not re-paid
    c = read_json(d / "run" / "artifacts" / "cascade.json")
    assert not c["budget_stopped"]
    recs = [e for e in escalations(d / "run") if e["student_id"] == c["student_id"]]
    # every escalated item got its LLM answers on the rerun: none is stuck as "never asked"
    assert recs and all(e["llm_answers"] for e in recs)
    for split in ("test", "pool"):
        n_esc = round((c[split]["routes"]["llm"] + c[split]["routes"]["human"]) * c[split]["n"])
        assert sum(e["split"] == split for e in recs) == n_esc


@pytest.mark.parametrize("probs, status, label, contest, route, answer", [
    ([.9, .1], None, None, .5, "student", "x"),             # above tau: the LLM is never asked
    ([.6, .4], "accepted", "y", .5, "llm", "y"),            # .4 * .85 / (.34 + .6 * .15) = .79: the LLM's label stands
    ([.6, .4], "accepted", "y", .8, "human", "y"),           # .79 < .8: contested; y stays the top of the evidence
    ([.79, .21], "accepted", "y", .5, "llm", "y"),           # .21 * .85 / (.1785 + .79 * .15) = .60
    ([.79, .01, .2], "accepted", "y", .5, "human", "x"),    # .0085 / (.0085 + .99 * .075) = .10: student's x wins
    ([.79, .01, .2], "accepted", "y", 0.0, "llm", "y"),     # contest off: the original student-then-LLM rule
    ([.6, .4], "disagreed", "y", .5, "human", "y"),         # the LLM was unsure: a person, its answer as the guess
    ([.6, .4], "failed", None, .5, "human", "x"),            # no answer at all: the student's guess
])
def test_decide_combines_student_and_llm(probs, status, label, contest, route, answer):
    from flywheel.cascade import decide
    classes = ["x", "y", "z"][:len(probs)]
    d = decide(probs, classes, 0.8, status, label, teacher_acc=0.85, contest_below=contest)
    assert (d.route, d.label) == (route, answer)


def test_combined_rule_against_the_plain_rule_on_the_same_answers(llm_run, tmp_path, monkeypatch):
    """cascade.json compares the combined rule with student-then-LLM on the same LLM answers: the counts
    reconcile, contest_below 0 is the plain rule, and changing it asks the teacher nothing new."""
    src, truth = llm_run
    d = tmp_path / "r"
    shutil.copytree(src, d)
    monkeypatch.setenv("OPENROUTER_API_KEY", KEY)
    run = d / "run"
    out = {}
    with LoopbackTeacher(truth, CLASSES, wrong_rate=0.15, seed=2) as srv:
        for contest in (0.5, 0.0, 0.99):
            cascade_llm(d, srv, "--contest_below", contest)
            out[contest] = read_json(run / "artifacts" / "cascade.json")
            if contest == 0.5:
                asked = dict(srv.requests)
        assert srv.requests == asked  # rerouting reuses the logged answers
    for contest, c in out.items():
        r = c["rule_comparison"]
        assert r["contest_below"] == contest and r["llm_calls_both"] == c["test"]["llm_calls"]
        assert r["combined"]["to_person"] == r["student_then_llm"]["to_person"] + r["contested"]
        assert r["combined"]["wrong_without_person"] == r["student_then_llm"]["wrong_without_person"] - r["contested_llm_wrong"]
        assert r["combined"]["to_person"] == round(c["test"]["routes"]["human"] * c["test"]["n"])
    assert out[0.0]["rule_comparison"]["contested"] == 0
    assert out[0.0]["rule_comparison"]["combined"] == out[0.0]["rule_comparison"]["student_then_llm"]
    assert out[0.99]["rule_comparison"]["contested"] > out[0.5]["rule_comparison"]["contested"]
    # a contested LLM label waits for a person: in human_review.csv although the LLM's answer was accepted
    hr = {r["path"]: r for r in read_csv(run / "human_review.csv") if r["split"] == "test"}
    c = out[0.99]
    contested = [e for e in escalations(run) if e["student_id"] == c["student_id"] and e["split"] == "test"
                 and e["llm_status"] == "accepted" and e["llm_posterior"] is not None and e["llm_posterior"] < 0.99]
    assert contested and all(e["path"] in hr for e in contested)

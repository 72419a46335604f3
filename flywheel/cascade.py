"""The cascade: route each item student -> LLM -> human, log every escalation, summarise the routes.

Routing (tau from the validation split, never from test):
  1. student calibrated confidence >= tau: the student's label;
  2. else the LLM, through the same dual-pass QC and ledger as the label step (nothing is paid twice);
  3. a human when the LLM is unsure (passes disagree, low confidence, invalid, failed or out of budget),
     or when its accepted label is contested: the evidence combined (the student's calibrated
     probabilities times the teacher's accuracy, estimated on gold pins) makes the LLM's label less likely
     than --contest_below to be right, which is what a confident student disagreeing with the LLM looks like.

escalations.jsonl is append-only: one record per escalated item and student, written as each item
finishes, so a killed cascade resumes where it stopped without re-logging or re-asking.
"""
import logging
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from flywheel.io import Closing, JsonlAppender

log = logging.getLogger(__name__)

ROUTES = ("student", "llm", "human")
SWEEP_TAUS = [round(x, 2) for x in np.linspace(0.2, 1.0, 41)]


class EscalationLog(Closing):
    """escalations.jsonl: {(student_id, split, path): record}; tolerates a torn last line."""

    def __init__(self, path):
        self._file = JsonlAppender(path, lambda r: isinstance(r, dict) and {"student_id", "split", "path"} <= set(r))
        self.path = self._file.path
        self.records = {self._key(r): r for r in self._file.records}

    @staticmethod
    def _key(r):
        return r["student_id"], r["split"], r["path"]

    def get(self, student_id, split, path):
        return self.records.get((student_id, split, path))

    def append(self, rec):
        rec = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **rec}
        return self._file.append(rec, on_written=lambda r, _end: self.records.__setitem__(self._key(r), r))

    def close(self):
        self._file.close()


DEFAULT_TEACHER_ACC = 0.85  # prior accuracy of accepted teacher labels when no gold pins estimated it
NONE_OF_THESE = "none_of_these"  # a person's answer for an image of no listed class: it never trains

def escalation_record(student_id, turn, split, path, sha256, probs, classes, tau, route, llm_status, llm_label,
                      answers, human_label=None, human_source=None, llm_posterior=None, llm_p_right=None):
    """One escalations.jsonl record (the cascade's and the server's): the student's view, the route, and
    the LLM's answers (ledger records) with what they cost.

    >>> r = escalation_record("s1", 0, "pool", "a.jpg", "ab", [0.4, 0.6], ["x", "y"], 0.9, "llm", "accepted", "y",
    ...                       [{"pass": 1, "label": "y", "confidence": 0.8, "cost_usd": 0.001}])
    >>> r["student_pred"], r["student_conf"], r["llm_cost_usd"], r["llm_answers"][0]["latency_s"]
    ('y', 0.6, 0.001, 0.0)
    """
    k = int(np.argmax(probs))
    return {"student_id": student_id, "turn": turn, "split": split, "path": path, "sha256": sha256,
            "student_probs": [round(float(p), 6) for p in probs], "student_pred": classes[k],
            "student_conf": round(float(probs[k]), 6), "tau": tau, "route": route, "llm_status": llm_status,
            "llm_label": llm_label or None,
            "llm_answers": [{"pass": r["pass"], "label": r["label"], "confidence": r["confidence"],
                             "cost_usd": r.get("cost_usd", 0.0), "latency_s": r.get("latency_s", 0.0),
                             "source": r.get("source")} for r in answers],
            "llm_cost_usd": round(sum(float(r.get("cost_usd") or 0) for r in answers), 6),
            "human_label": human_label, "human_source": human_source,
            "llm_posterior": None if llm_posterior is None else round(float(llm_posterior), 6),
            # the label model's probability that the LLM's label is right (model QC), weighed against the student's
            "llm_p_right": None if llm_p_right is None else round(float(llm_p_right), 6)}


def merge_human_rows(path, fields, rows, keep_queued=False):
    """Write human_review.csv rows into the file under its lock, merged with what is there now: a serving process
    and a cascade step may both add rows, and a person's answer (label_final) in the file is never overwritten by
    a row without one; keep_queued: nor is any row already there (a queued upload keeps its first record). -> the
    merged rows.

    >>> import tempfile, pathlib; p = pathlib.Path(tempfile.mkdtemp()) / "h.csv"
    >>> _ = merge_human_rows(p, ["path", "label_final"], [{"path": "a", "label_final": "pear"}])
    >>> [r.get("label_final") for r in merge_human_rows(p, ["path", "label_final"], [{"path": "a", "label_final": ""}, {"path": "b"}])]
    ['pear', None]
    """
    from flywheel.io import FileLock, read_csv, write_csv
    with FileLock(path):
        now = {r["path"]: r for r in (read_csv(path) if Path(path).exists() else [])}
        for r in rows:
            if r["path"] not in now or not (keep_queued or (now[r["path"]].get("label_final") or "").strip()):
                now[r["path"]] = r
        write_csv(path, fields, list(now.values()))
        return list(now.values())


def review_row(rec, turn, label_final="", source=""):
    """The human_review.csv row of an escalation record (the cascade's and the server's queue alike).

    >>> r = review_row({"path": "a.jpg", "split": "pool", "student_pred": "x", "student_conf": 0.41,
    ...                 "llm_answers": [{"label": "y", "confidence": 0.6}], "llm_status": "disagreed"}, 2)
    >>> r["student_conf"], r["llm_answers"], r["label_final"], r["turn"]
    ('0.4100', 'y@0.6', '', 2)
    """
    return {"path": rec["path"], "split": rec["split"], "student_label": rec["student_pred"],
            "student_conf": f"{rec['student_conf']:.4f}",
            "llm_answers": "|".join(f"{a['label']}@{a['confidence']}" for a in rec["llm_answers"])
            or ("not asked" if rec["llm_status"] == "not_asked" else rec["llm_status"]),
            "llm_status": rec["llm_status"], "label_final": label_final, "source": source, "turn": turn}


def route_of(student_conf, tau, llm_status, llm_posterior=1.0, contest_below=0.0):
    """The route an item takes. llm_posterior: the probability that the LLM's accepted label is right, the
    evidence combined (combined_posterior); below contest_below the label is contested and goes to a person
    (contest_below 0: the LLM's accepted label always stands, the original student-then-LLM rule).

    >>> route_of(0.9, 0.8, None), route_of(0.5, 0.8, "accepted"), route_of(0.5, 0.8, "disagreed")
    ('student', 'llm', 'human')
    >>> route_of(0.5, 0.8, "accepted", llm_posterior=0.3, contest_below=0.5)  # a contested LLM label
    'human'
    """
    if student_conf >= tau:
        return "student"
    return "llm" if llm_status == "accepted" and llm_posterior >= contest_below else "human"


def combined_posterior(p_student, llm_index, teacher_acc):
    """P(class | the student's calibrated probabilities, the LLM answered class llm_index): the student's
    probabilities times the LLM's likelihood (right with probability teacher_acc, its errors spread evenly
    over the other classes), normalised; the two are taken as independent evidence. float [C].

    Student [.6, .3, .1], LLM says class 1 at accuracy .8 (an error lands on each other class with .1):
    [.6 * .1, .3 * .8, .1 * .1] = [.06, .24, .01], / .31:
    >>> [round(float(x), 3) for x in combined_posterior([0.6, 0.3, 0.1], 1, 0.8)]
    [0.194, 0.774, 0.032]
    """
    p = np.asarray(p_student, np.float64)
    like = np.full(len(p), (1.0 - teacher_acc) / max(len(p) - 1, 1))
    like[llm_index] = teacher_acc
    q = p * like
    return q / q.sum() if q.sum() > 0 else like / like.sum()


class Decision(NamedTuple):
    route: str             # student | llm | human
    label: str             # the answer returned: the student's, the LLM's, or the best guess so far for a person
    llm_posterior: float   # P(the LLM's label is right | the evidence); None when it gave no accepted label


def decide(probs, classes, tau, llm_status=None, llm_label=None, teacher_acc=DEFAULT_TEACHER_ACC, contest_below=0.0):
    """The cascade's rule for one item, used by the cascade step and the server alike.

    probs: the student's calibrated probabilities [C] in `classes` order. For a person, label is the best
    guess so far: the combined evidence's top class for a contested LLM label, else the LLM's answer if it
    gave one, else the student's.

    >>> decide([.9, .1], ["x", "y"], 0.8)
    Decision(route='student', label='x', llm_posterior=None)
    >>> d = decide([.7, .3], ["x", "y"], 0.8, "accepted", "y", teacher_acc=0.9, contest_below=0.5)  # .27 / (.27 + .07)
    >>> d.route, d.label, round(d.llm_posterior, 3)
    ('llm', 'y', 0.794)
    >>> d = decide([.98, .02], ["x", "y"], 0.99, "accepted", "y", teacher_acc=0.9, contest_below=0.5)  # .018 / .116
    >>> d.route, d.label, round(d.llm_posterior, 3)
    ('human', 'x', 0.155)
    >>> decide([.6, .4], ["x", "y"], 0.8, "disagreed", "y").label
    'y'
    """
    probs = np.asarray(probs, np.float64)
    k = int(probs.argmax())
    conf = float(probs[k])
    if conf >= tau:
        return Decision("student", classes[k], None)
    post, guess = None, llm_label or classes[k]
    if llm_status == "accepted" and llm_label in classes:
        q = combined_posterior(probs, classes.index(llm_label), teacher_acc)
        post, guess = float(q[classes.index(llm_label)]), classes[int(q.argmax())]
    route = route_of(conf, tau, llm_status, 1.0 if post is None else post, contest_below)
    return Decision(route, llm_label if route == "llm" else guess, post)


def sign_test(wins, losses) -> float:
    """One-sided sign test: P(at most `wins` of wins + losses fair coin flips), the p-value that the first
    side is worse. Discordant pairs only (both right or both wrong says nothing).

    >>> sign_test(1, 4), sign_test(0, 5), sign_test(3, 3)
    (0.1875, 0.03125, 0.65625)
    """
    from math import comb
    n = wins + losses
    return sum(comb(n, k) for k in range(wins + 1)) / 2 ** n if n else 1.0


def escalation_value(student_right, llm_right) -> dict:
    """What escalation buys, on gold pins (true labels) the student is unsure of: among the n below tau that
    the teacher answered, how often its first answer was right against the student's, and the sign test's
    p-value that the LLM is worse there (pairs where exactly one is right). Measured, never chosen on.

    student_right, llm_right: per gold pin below tau (llm_right None: the teacher was not asked).
    >>> escalation_value([True, False, True], [True, True, None])
    {'n': 2, 'llm_right': 1.0, 'student_right': 0.5, 'p_llm_worse': 1.0}
    """
    asked = [(bool(s), bool(l)) for s, l in zip(student_right, llm_right) if l is not None]
    n = len(asked)
    return {"n": n, "llm_right": round(sum(l for _, l in asked) / n, 4) if n else None,
            "student_right": round(sum(s for s, _ in asked) / n, 4) if n else None,
            "p_llm_worse": round(sign_test(sum(l and not s for s, l in asked), sum(s and not l for s, l in asked)), 4)}


def rule_comparison(combined, plain, llm_calls, contest_below):
    """The combined rule against the student-then-LLM rule it replaces, on the same LLM answers (so the
    same calls). combined, plain: one split's [{route, final, true}] under each rule, item by item (final
    None: waiting for a person). Counts the wrong answers returned without a person and the items sent
    to one. Uses the split's ground truth: measuring only, never choosing.

    Two items; the LLM said "b" for the second, the combined rule contested it, and it was wrong:
    >>> c = rule_comparison([{"route": "student", "final": "a", "true": "a"}, {"route": "human", "final": None, "true": "a"}],
    ...                     [{"route": "student", "final": "a", "true": "a"}, {"route": "llm", "final": "b", "true": "a"}],
    ...                     2, 0.5)
    >>> c["combined"], c["student_then_llm"]["wrong_without_person"], c["contested"], c["contested_llm_wrong"]
    ({'wrong_without_person': 0, 'to_person': 1, 'accuracy_without_person': 1.0}, 1, 1, 1)
    """
    def tally(items):
        auto = [x for x in items if x["route"] != "human"]
        return {"wrong_without_person": sum(x["final"] != x["true"] for x in auto), "to_person": len(items) - len(auto),
                "accuracy_without_person": (sum(x["final"] == x["true"] for x in auto) / len(auto)) if auto else None}
    contested = [y for x, y in zip(combined, plain) if x["route"] == "human" and y["route"] == "llm"]
    return {"contest_below": contest_below, "combined": tally(combined), "student_then_llm": tally(plain),
            "contested": len(contested), "contested_llm_wrong": sum(y["final"] != y["true"] for y in contested),
            "llm_calls_both": llm_calls,
            "what": "the same LLM answers routed by each rule; ground truth used to measure, never to choose"}


def summarize(items, n_calls, cost_usd, calls_per_item, cost_per_call, student_ms, llm_call_ms):
    """One split's cascade.json section. items: [{route, final, true}] where final is None for a
    human item still waiting for an answer (excluded from accuracy, counted in human_pending).

    >>> s = summarize([{"route": "student", "final": "a", "true": "a"}, {"route": "llm", "final": "b", "true": "a"}],
    ...               n_calls=2, cost_usd=0.002, calls_per_item=2, cost_per_call=0.001, student_ms=5, llm_call_ms=1000)
    >>> s["routes"], s["accuracy"], s["llm_only_calls"], s["mean_latency_ms"]
    ({'student': 0.5, 'llm': 0.5, 'human': 0.0}, 0.5, 4, 1005.0)
    """
    n = len(items)
    routes, route_acc = {}, {}
    for r in ROUTES:
        sub = [i for i in items if i["route"] == r]
        routes[r] = len(sub) / n if n else 0.0
        ans = [i for i in sub if i["final"] is not None]
        route_acc[r] = (sum(i["final"] == i["true"] for i in ans) / len(ans)) if ans else None
    answered = [i for i in items if i["final"] is not None]
    return {"n": n, "routes": routes, "route_accuracy": route_acc,
            "accuracy": (sum(i["final"] == i["true"] for i in answered) / len(answered)) if answered else None,
            "human_pending": n - len(answered),
            "escalation_rate": 1.0 - routes["student"] if n else 0.0,
            "llm_calls": int(n_calls), "cost_usd": round(float(cost_usd), 6),
            "llm_only_calls": int(round(n * calls_per_item)),
            "llm_only_cost_usd": round(n * calls_per_item * cost_per_call, 6),
            # the student sees every item; escalated items add their LLM calls, one after another
            "mean_latency_ms": round(student_ms + (n_calls / n if n else 0.0) * llm_call_ms, 3)}


def tau_sweep(conf, student_correct, escalated_acc, taus=SWEEP_TAUS):
    """For each tau: escalation rate and overall accuracy, counting escalated items as right with
    probability escalated_acc (the measured accuracy of the LLM+human routes), so the curve is an
    estimate for taus other than the one actually run; student_precision is exact.

    >>> tau_sweep(np.array([0.9, 0.5]), np.array([1, 0]), 1.0, [0.6])
    [{'tau': 0.6, 'escalation_rate': 0.5, 'accuracy': 1.0, 'student_precision': 1.0}]
    """
    conf, ok = np.asarray(conf, np.float64), np.asarray(student_correct, np.float64)
    out = []
    for t in taus:
        acc_m = conf >= t
        n = len(conf)
        esc = float((~acc_m).mean()) if n else 0.0
        accuracy = (ok[acc_m].sum() + (~acc_m).sum() * escalated_acc) / n if n else None
        out.append({"tau": float(t), "escalation_rate": esc, "accuracy": None if accuracy is None else float(accuracy),
                    "student_precision": float(ok[acc_m].mean()) if acc_m.any() else None})
    return out

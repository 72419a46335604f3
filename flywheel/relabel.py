"""What a flywheel turn adds to training, and at what cost: pool answers the cascade already paid for
(kept when the evidence supports them), the relabel picks (targeted, or the random and margin controls),
labels serving collected, and pseudo labels; every person's answer passes the one rule in review.label_row.
"""
import json
import logging
import random
from typing import NamedTuple

from flywheel.cascade import DEFAULT_TEACHER_ACC, combined_posterior
from flywheel.io import read_csv, read_json, read_jsonl
from flywheel.review import FlywheelLabel, human_answers, label_row
from flywheel.routing import teacher_accuracy
from flywheel.run import Turn
from flywheel.student import load_student
from flywheel.training import count_by

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- relabel selection
UNANSWERABLE = ("disagreed", "low_confidence", "flagged", "invalid")  # the ledger holds a rejected answer: asking again repeats it


def paid_labels(pool, escalations, classes, teacher_acc, min_posterior=0.5):
    """Pool items the cascade already paid the LLM for and whose accepted answer the evidence supports:
    {path: label}. They train at no new cost, so no relabel pick is spent on them.

    A label is kept when escalation_posterior (the student's calibrated probability for it, combined with the
    teacher's accuracy) is at least min_posterior: more likely right than wrong.

    >>> esc = {"a": {"llm_status": "accepted", "llm_label": "y", "student_probs": [.55, .45]},
    ...        "b": {"llm_status": "accepted", "llm_label": "y", "student_probs": [.99, .01]},
    ...        "c": {"llm_status": "disagreed", "llm_label": "x", "student_probs": [.5, .5]},
    ...        "z": {"llm_status": "accepted", "llm_label": "x", "student_probs": [.9, .1]}}
    >>> paid_labels([{"path": p} for p in "abc"], esc, ["x", "y"], 0.85)  # b: .01 for y -> .13; z: not in the pool
    {'a': 'y'}
    """
    in_pool = {r["path"] for r in pool}
    return {p: e["llm_label"] for p, e in escalations.items()
            if p in in_pool and e.get("llm_status") == "accepted" and e.get("llm_label") in classes
            and escalation_posterior(e, classes, teacher_acc) >= min_posterior}


def escalation_posterior(e, classes, teacher_acc):
    """The probability that an escalation record's LLM label is right (combined_posterior), from the
    student_probs it logged (in `classes` order); the teacher's accuracy alone when the record has no usable
    probabilities.

    Student .05 for the label, 5 classes, teacher .85: .0425 / (.0425 + .95 * .0375) = .544
    >>> round(escalation_posterior({"llm_label": "a", "student_probs": [.05, .5, .15, .15, .15]}, list("abcde"), .85), 3)
    0.544
    """
    if classes and e.get("student_probs") and e.get("llm_label") in classes:
        i = classes.index(e["llm_label"])
        return float(combined_posterior(e["student_probs"], i, teacher_acc)[i])
    return teacher_acc


def pick_relabels(pool, escalations, n, strategy="targeted", answered=(), seed=0, classes=None,
                  teacher_acc=DEFAULT_TEACHER_ACC, min_posterior=0.9, doubt_below=0.5):
    """Which pool items a flywheel turn relabels, at most n, as (paths, why).

    pool: [{path, pred, margin}] (the student's pool predictions); escalations: {path: record} of this
    student (llm_status, llm_label, student_pred, student_conf, student_probs in `classes` order);
    answered: pool paths a person labeled.
      targeted: a person's answers first (their work is never wasted). Then escalations whose accepted
        LLM label is probably right (escalation_posterior >= min_posterior, combining the student's calibrated
        probability for it with teacher_acc, estimated from gold pins), least confident student first:
        labels the student was unsure of, already paid for. Then never-asked items, a seeded uniform sample:
        the cascade's paid answers already cover what the student was unsure of, and on real images ordering
        the rest by a weak student's margin, or balancing them by its predicted classes, skewed what was added
        and lost 1.5-5 points to a random pick. Then the remaining accepted escalations, most probable first.
        Skipped: items whose ledger answer was rejected (disagreed, low confidence, invalid) unless a person
        answered them, since asking again returns the same answer; and LLM labels the evidence says are more
        likely wrong than right (posterior below doubt_below: 0.5, or the cascade's --contest_below when
        higher, so a label sent to a person never trains as the LLM's).
      random: a uniform sample (the control: same budget, same epochs).
      margin: lowest student margin first, nothing skipped.

    >>> pool = [{"path": p, "pred": c, "margin": m} for p, c, m in
    ...         [("a", "x", .1), ("b", "x", .2), ("c", "y", .3), ("d", "y", .05), ("e", "x", .01)]]
    >>> esc = {"e": {"llm_status": "accepted", "llm_label": "y", "student_pred": "x", "student_conf": .55,
    ...              "student_probs": [.55, .45]},
    ...        "d": {"llm_status": "disagreed", "llm_label": "x", "student_pred": "y", "student_conf": .5}}
    >>> pick_relabels(pool, esc, 3, classes=["x", "y"], teacher_acc=0.95)[0]  # e: posterior .94, d: rejected
    ['e', 'a', 'c']
    >>> pick_relabels(pool, esc, 3, classes=["x", "y"], teacher_acc=0.85)[0]  # e: .82, after the never-asked sample
    ['a', 'c', 'b']
    >>> pick_relabels(pool, esc, 3, "margin")[0]
    ['e', 'd', 'a']
    """
    in_pool = {r["path"] for r in pool}
    if strategy == "random":
        picked = random.Random(seed).sample(sorted(in_pool), min(n, len(in_pool)))
        return picked, {"strategy": strategy, "picked": len(picked)}
    if strategy == "margin":
        picked = [r["path"] for r in sorted(pool, key=lambda r: float(r["margin"]))][:n]
        return picked, {"strategy": strategy, "picked": len(picked)}
    human = [p for p in answered if p in in_pool]
    ok = {p: escalation_posterior(e, classes, teacher_acc) for p, e in escalations.items()
          if p in in_pool and e.get("llm_status") == "accepted" and e.get("llm_label")}
    sure = sorted((p for p, q in ok.items() if q >= min_posterior), key=lambda p: float(escalations[p].get("student_conf") or 0))
    rest = sorted((p for p, q in ok.items() if doubt_below <= q < min_posterior), key=lambda p: -ok[p])
    doubtful = {p for p, q in ok.items() if q < doubt_below}
    skipped = {p for p, e in escalations.items() if p in in_pool and e.get("llm_status") in UNANSWERABLE}
    skipped = (skipped | doubtful) - set(human)
    fresh = sorted(r["path"] for r in pool if r["path"] not in escalations)
    random.Random(seed).shuffle(fresh)
    picked = list(dict.fromkeys(human + sure + fresh + rest))[:n]
    tiers = {"human_answered": set(human), "llm_label_probable": set(sure), "never_asked_sample": set(fresh),
             "llm_label_plausible": set(rest)}
    return picked, {"strategy": strategy, "picked": len(picked), "skipped": len(skipped),
                    **{t: sum(p in v for p in picked) for t, v in tiers.items()}}


class TurnEvidence(NamedTuple):
    """What a turn's student said about the pool: its predictions and its escalation records."""
    pool: list           # [{path, pred, margin, escalated}] from pool_predictions.csv
    escalations: dict    # {path: escalation record} of this student, split pool
    classes: list        # the order of student_probs in the records
    teacher_acc: float   # accuracy of accepted teacher labels, from gold pins (never the manifest's truth)


def turn_evidence(P, T: Turn) -> TurnEvidence:
    preds = read_csv(P.need(T.pool_predictions, "cascade"))
    sid = read_json(T.cascade)["student_id"]
    esc = {r["path"]: r for r in read_jsonl(P.escalations)[0] if r.get("student_id") == sid and r.get("split") == "pool"}
    return TurnEvidence(preds, esc, load_student(T.best)["classes"], teacher_accuracy(P))


def doubt_threshold(contest_below) -> float:
    """An LLM label less likely than this to be right is no answer: 0.5, or --contest_below when higher.

    >>> doubt_threshold(0.3), doubt_threshold(0.7)
    (0.5, 0.7)
    """
    return max(0.5, contest_below)


class TurnLabels(NamedTuple):
    """What turn k trains on beyond the label step's rows, by where it came from."""
    picks: list          # [FlywheelLabel] from the relabel picks (a person's answer, else an accepted LLM label)
    paid: list           # [FlywheelLabel] pool answers the cascade already paid for
    pseudo: list         # [FlywheelLabel] the student's own labels (--pseudo_labels on)

    def all(self):
        return self.picks + self.paid + self.pseudo


def turn_labels(k, classes, picked, verdicts, paid, ev, humans, pseudo_on, where) -> TurnLabels:
    """Turn k's labels from its picks ({path: Verdict} of the relabel calls), the paid pool answers
    ({path: LLM label}) and, with pseudo_on, the student's own labels on never-asked pool items it takes
    itself. A person's answer goes through review.label_row, the one rule, in every case."""
    accepted = {p: (v.label, "escalation") for p, v in verdicts.items() if v.status == "accepted"}
    picks = [r for p in picked if (r := label_row(p, k, classes, humans.get(p), accepted.get(p), where))]
    paid_rows = [r for p, lab in sorted(paid.items()) if (r := label_row(p, k, classes, humans.get(p), (lab, "cascade"), where))]
    taken = {r.path for r in picks + paid_rows} | set(picked)
    pseudo = [FlywheelLabel(r["path"], r["pred"], "pseudo", k) for r in ev.pool
              if r["path"] not in taken and r["path"] not in ev.escalations and r["escalated"] == "0"] if pseudo_on else []
    return TurnLabels(picks, paid_rows, pseudo)


def production_labels(P, manifest, classes, k, taken) -> list:
    """Labels serving collected (escalations.jsonl split production): a person's answer from
    human_review.csv, else an LLM answer QC accepted. An upload whose bytes are a test image's never
    trains. -> [FlywheelLabel] for turn k."""
    test_shas = {r["sha256"] for r in manifest.values() if r["split"] == "test"}
    humans = human_answers(P)
    out = {}
    for r in read_jsonl(P.escalations)[0] if P.escalations.exists() else []:
        p = r.get("path", "")
        if r.get("split") != "production" or p in taken or p in out or not (P.out / p).exists():
            continue
        if {r.get("sha256"), r.get("upload_sha256")} & test_shas:
            log.warning("flywheel: production upload %s is a test image; it does not train", p)
            continue
        llm = (r["llm_label"], "escalation") if r.get("route") == "llm" and r.get("llm_label") in classes else None
        row = label_row(p, k, classes, humans.get(p), llm, str(P.human_review))
        if row is not None:
            out[p] = row
    if out:
        log.info("flywheel turn %d: %d label(s) from serving (%s)", k, len(out),
                 json.dumps(count_by([r._asdict() for r in out.values()], "source")))
    return list(out.values())

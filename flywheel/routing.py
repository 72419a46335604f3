"""One cascade run over a turn's student: the threshold tau fitted on validation, the student on every test
and pool item, the LLM (through labeling, so the ledger, QC and budget apply) on those below tau not yet
answered for this student, then every item settled under the rule in force and, on the same LLM answers,
under the student-then-LLM control. -> escalations.jsonl, human_review.csv, cascade.json, pool_predictions.csv

The decisions themselves are pure functions in cascade.py; this module runs them over a run's files.
"""
import hashlib
import logging
from typing import NamedTuple

import numpy as np

from flywheel.calibrate import (coverage_precision, margin, softmax, threshold_for_budget,
                                threshold_for_precision)
from flywheel.cascade import (DEFAULT_TEACHER_ACC, decide, escalation_record, escalation_value, merge_human_rows, review_row, route_of, rule_comparison,
                              summarize, tau_sweep)
from flywheel.costs import LLM_ONLY_CALLS_PER_ITEM
from flywheel.inference import student_probs
from flywheel.io import read_csv, read_json, write_csv, write_json
from flywheel.labeling import label_items
from flywheel.report import fmt
from flywheel.review import HUMAN_FIELDS, human_answers
from flywheel.run import Turn, heldout_rows, item, pool_rows
from flywheel.student import load_student

log = logging.getLogger(__name__)

POOL_FIELDS = ["path", "pred", "confidence", "margin", "escalated"]


class Threshold(NamedTuple):
    tau: float            # the student answers alone at calibrated confidence >= tau
    rule: str             # how tau was chosen, for people
    val: dict             # {val_coverage, val_precision, n_val} on the validation split


def fit_tau(best, tau=None, escalation_budget=None, target_precision=0.95) -> Threshold:
    """tau on the validation split: the lowest threshold reaching target_precision, or the one escalating at
    most escalation_budget; or tau as given by hand."""
    vp = softmax(best["val_logits"], best["temperature"])
    conf, correct = vp.max(1), vp.argmax(1) == best["val_labels"]
    if tau is not None:
        rule = f"tau={tau} fixed by hand"
    elif escalation_budget is not None:
        tau, rule = threshold_for_budget(conf, escalation_budget), f"escalation_budget={escalation_budget}"
    else:
        tau, rule = threshold_for_precision(conf, correct, target_precision), f"target_precision={target_precision}"
    cov, prec = coverage_precision(conf, correct, tau)
    if tau > 1.0:
        log.warning("no threshold reaches %s on the %d validation images: every item escalates to the LLM", rule, len(conf))
    return Threshold(tau, rule, {"val_coverage": cov, "val_precision": prec, "n_val": len(conf)})


def student_id_of(best) -> str:
    """A content id for a trained student (its validation logits), to key escalation records."""
    return hashlib.sha256(best["val_logits"].tobytes()).hexdigest()[:16]


def teacher_accuracy(P) -> float:
    """Accuracy of accepted teacher labels, estimated from gold pins by the label step (never from the
    manifest's truth); DEFAULT_TEACHER_ACC when no gold pins estimated it."""
    est = (read_json(P.label_summary).get("estimated_accuracy") or {}) if P.label_summary.exists() else {}
    return est.get("accuracy") or DEFAULT_TEACHER_ACC


class CascadeContext(NamedTuple):
    """What routing one item needs, shared by the splits of one cascade run."""
    sid: str              # student id (escalation records are keyed by it)
    turn: int
    classes: list
    tau: float
    teacher_acc: float    # from gold pins: weighs the LLM's answer against the student's probabilities
    contest_below: float  # an accepted LLM label less likely than this to be right goes to a person
    humans: dict          # {path: Answer} answered in human_review.csv
    truth: dict           # {path: label} for --simulate_human (SIMULATED answers), else {}

    def decide(self, probs, e=None):
        """The rule for one item; an LLM label the label model judged (llm_p_right) is weighed at that
        probability, else at the teacher's accuracy on gold."""
        acc = (e.get("llm_p_right") if e else None) or self.teacher_acc
        return decide(probs, self.classes, self.tau, e and e["llm_status"], e and e["llm_label"], acc, self.contest_below)

    def person(self, path):
        """A person's answer so far: (label, source) or (None, None)."""
        if path in self.humans:
            return tuple(self.humans[path])
        return (self.truth[path], "simulated_human") if path in self.truth else (None, None)


class CascadeIO(NamedTuple):
    """The files and clients one cascade run writes through."""
    esc: object          # flywheel.cascade.EscalationLog
    teacher: object
    ledger: object
    qc: object
    budget: object
    human_rows: dict     # {path: human_review.csv row}, written whole at the end


class EscalationLogger:
    """label_items' on_done for one split: each item the LLM phase finishes becomes an escalation record,
    appended before the next one finishes (a killed cascade resumes without re-asking). Items with no LLM
    answer (budget stop, errors) are not settled: kept in .unsettled, never logged, asked again next run."""

    def __init__(self, ctx, esc, split, rows, probs, p_right=False):
        self.ctx, self.esc, self.split, self.probs = ctx, esc, split, probs
        self.p_right = p_right  # model QC: a verdict's confidence is the label model's P(label right)
        self.index = {r["path"]: i for i, r in enumerate(rows)}
        self.unsettled = {}

    def __call__(self, it, verdict):
        ctx, probs = self.ctx, self.probs[self.index[it["path"]]]
        p_right = verdict.confidence if self.p_right and verdict.status == "accepted" else None
        d = ctx.decide(probs, {"llm_status": verdict.status, "llm_label": verdict.label, "llm_p_right": p_right})
        h_lab, h_src = ctx.person(it["path"]) if d.route == "human" else (None, None)
        rec = escalation_record(ctx.sid, ctx.turn, self.split, it["path"], it["sha256"], probs, ctx.classes, ctx.tau,
                                d.route, verdict.status, verdict.label, verdict.records, h_lab, h_src, d.llm_posterior,
                                p_right)
        if verdict.status == "failed":
            self.unsettled[it["path"]] = rec
        else:
            self.esc.append(rec)


class Settled(NamedTuple):
    items: list        # [{route, final, true}] under the rule in force (final None: waiting for a person)
    plain: list        # the same items under the student-then-LLM rule (the control: same LLM answers)
    n_calls: int       # LLM calls behind this split's escalations
    cost_usd: float


def settle_split(ctx, rows, probs, records, human_rows):
    """Every item's route and answer from the student's probabilities and its escalation record (the route
    is recomputed with the current rule, so changing --contest_below needs no new calls). Human-routed items
    get a row in human_rows (a person's earlier answer kept). -> Settled"""
    s = Settled([], [], 0, 0.0)
    for i, r in enumerate(rows):
        e = records.get(r["path"])
        d = ctx.decide(probs[i], e)
        if d.route == "student":
            s.items.append({"route": "student", "final": d.label, "true": r["label"]})
            s.plain.append(s.items[-1])
            continue
        s = s._replace(n_calls=s.n_calls + len(e["llm_answers"]), cost_usd=s.cost_usd + e["llm_cost_usd"])
        h_lab, h_src = ctx.person(r["path"])
        person = h_lab or e.get("human_label")
        final = e["llm_label"] if d.route == "llm" else person
        if d.route == "human":
            old = human_rows.get(r["path"], {})
            human_rows[r["path"]] = review_row(
                e, ctx.turn, old.get("label_final") or (h_lab or ""),
                old.get("source") if old.get("label_final") else (h_src or ""))
        s.items.append({"route": d.route, "final": final, "true": r["label"]})
        plain = route_of(float(probs[i].max()), ctx.tau, e["llm_status"])
        s.plain.append({"route": plain, "final": e["llm_label"] if plain == "llm" else person, "true": r["label"]})
    return s


def route_turn(cfg, P, manifest, T: Turn, turn, io: CascadeIO, device) -> dict:
    """Route the test split and the unlabeled pool through T's student -> LLM -> human. Writes
    human_review.csv (also when stopped) and T.cascade; returns cascade.json's content."""
    best = load_student(T.best)
    th = fit_tau(best, cfg["tau"], cfg["escalation_budget"], cfg["target_precision"])
    ctx = CascadeContext(student_id_of(best), turn, best["classes"], th.tau, teacher_accuracy(P), cfg["contest_below"],
                         human_answers(P), {p: r["label"] for p, r in manifest.items()} if cfg["simulate_human"] else {})
    log.info("cascade: tau = %.4f (%s; validation coverage %.3f, precision %s); student %s; an LLM label below "
             "%.2f probability of being right goes to a person (teacher accuracy %.3f)", th.tau, th.rule,
             th.val["val_coverage"], fmt(th.val["val_precision"]),
             ctx.sid, ctx.contest_below, ctx.teacher_acc)
    n_paid, mean_cost, mean_latency_s = io.ledger.paid_means(io.teacher.model)
    result = {"tau": th.tau, "tau_rule": th.rule, "target_precision": cfg["target_precision"],
              "escalation_budget": cfg["escalation_budget"], **th.val, "student_id": ctx.sid, "turn": turn,
              "contest_below": ctx.contest_below, "teacher_accuracy_from_gold": ctx.teacher_acc,
              "teacher": {"source": io.teacher.source, "model": io.teacher.model, "simulated": io.teacher.source == "oracle"},
              "simulated_human": bool(cfg["simulate_human"]),
              "inputs": {"calls_per_item_llm_only": LLM_ONLY_CALLS_PER_ITEM,
                         "cost_per_call_usd": mean_cost if n_paid else cfg["usd_per_call"],
                         "llm_call_ms": 1000 * mean_latency_s}}
    result["escalation_value_on_gold"] = gold_escalation_value(best, T, th.tau, manifest, io)
    try:
        for split, rows in {"test": heldout_rows(manifest), "pool": pool_rows(P, manifest, turn)}.items():
            result.update(cascade_split(P, T, best, ctx, io, manifest, split, rows, result["inputs"], cfg["max_workers"],
                                        device))
    finally:  # merged under its lock: a server may have queued uploads, and a person answered some, meanwhile
        merge_human_rows(P.human_review, HUMAN_FIELDS, list(io.human_rows.values()))
    result["budget_stopped"] = io.budget.stopped
    write_json(T.cascade, result)
    return result


def gold_escalation_value(best, T, tau, manifest, io):
    """escalation_value on the calibration set when it is the gold pins (else None: validation's labels are the
    teacher's own), from the teacher's first answers in the ledger; a warning when the LLM is significantly worse."""
    from flywheel.training import calibrated_on
    if not T.train_rows.exists() or calibrated_on(read_csv(T.train_rows)) != "gold pins":
        return None
    vp = softmax(best["val_logits"], best["temperature"])
    below = [i for i in range(len(vp)) if vp[i].max() < tau and best["val_paths"][i] in manifest]
    classes, y = best["classes"], best["val_labels"]
    answers = [io.ledger.ok(io.qc.call(manifest[best["val_paths"][i]]["sha256"], 1, io.teacher.model).key) for i in below]
    v = escalation_value([vp[i].argmax() == y[i] for i in below],
                         [None if a is None else a["label"] == classes[y[i]] for a, i in zip(answers, below)])
    if v["n"] and v["p_llm_worse"] < 0.05:  # a sign test: 30 pins can look bad by chance
        log.warning("cascade: on the %d gold pins below tau the LLM's first answer was right %.0f%% of the time and "
                    "the student %.0f%% (sign test p = %.3f): escalating costs accuracy here as well as money (improve "
                    "the student or the prompt, or set --escalation_budget lower)", v["n"], 100 * v["llm_right"],
                    100 * v["student_right"], v["p_llm_worse"])
    return v


def cascade_split(P, T, best, ctx, io, manifest, split, rows, inputs, max_workers, device):
    """One split through the cascade: the student on every item, the LLM on those below tau not yet
    answered for this student, then every item settled. -> {split: summary} (+ the sweep and the rule
    comparison for test; T.pool_predictions for the pool)"""
    per_call = (inputs["calls_per_item_llm_only"], inputs["cost_per_call_usd"])
    if not rows:
        return {split: summarize([], 0, 0.0, *per_call, 0.0, inputs["llm_call_ms"])}
    pr = student_probs(P, rows, best, device, f"student {split}")
    conf, pred = pr.probs.max(1), pr.probs.argmax(1)
    todo = [item(P, manifest, r["path"]) for i, r in enumerate(rows)
            if conf[i] < ctx.tau and io.esc.get(ctx.sid, split, r["path"]) is None]
    logger = EscalationLogger(ctx, io.esc, split, rows, pr.probs, p_right=io.qc.second_pass == "model")
    label_items(todo, io.teacher, io.ledger, io.qc, io.budget, "cascade", max_workers, f"cascade {split} LLM",
                on_done=logger)
    records = {r["path"]: io.esc.get(ctx.sid, split, r["path"]) or logger.unsettled[r["path"]]
               for i, r in enumerate(rows) if conf[i] < ctx.tau}
    s = settle_split(ctx, rows, pr.probs, records, io.human_rows)
    out = {split: {**summarize(s.items, s.n_calls, s.cost_usd, *per_call, pr.ms_per_image, inputs["llm_call_ms"]),
                   "student_ms_per_item": pr.ms_per_image}}
    if split == "test":
        esc_items = [x for x in s.items if x["route"] != "student" and x["final"] is not None]
        ls = read_json(P.label_summary) if P.label_summary.exists() else {}
        esc_acc = (sum(x["final"] == x["true"] for x in esc_items) / len(esc_items)) if esc_items else \
            (ls.get("teacher_accuracy") or 1.0)
        out["sweep"] = tau_sweep(conf, pred == np.array([ctx.classes.index(r["label"]) for r in rows]), esc_acc)
        out["sweep_note"] = (f"accuracy at taus other than {ctx.tau:.3f} counts escalated items as right with "
                             f"the measured LLM+human route accuracy {esc_acc:.3f}; student_precision is exact")
        out["rule_comparison"] = rule_comparison(s.items, s.plain, s.n_calls, ctx.contest_below)
    else:
        mg = margin(pr.probs)
        write_csv(T.pool_predictions, POOL_FIELDS,
                  [{"path": r["path"], "pred": ctx.classes[pred[i]], "confidence": f"{conf[i]:.6f}",
                    "margin": f"{mg[i]:.6f}", "escalated": int(conf[i] < ctx.tau)} for i, r in enumerate(rows)])
    return out


def open_human_rows(P) -> dict:
    """{path: human_review.csv row}: what the cascade keeps and rewrites whole at the end."""
    return {r["path"]: r for r in (read_csv(P.human_review) if P.human_review.exists() else [])}

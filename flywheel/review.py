"""What people see and answer, and the one rule that turns a person's answer into a training row.

review_labels.csv   the label step's verdict per sampled image; a person may edit label_final (ledger.py
                    holds the round trip: columns, merge with what a person decided, training labels)
human_review.csv    what the cascade and serving sent to a person; label_final is the answer (a class,
                    none_of_these, or empty while it waits)
label_flags.csv     labels the held-out model contradicted (sent to review)
label_summary.json  the label step's figures, all recomputed from the ledger
"""
import logging
from typing import NamedTuple

from flywheel import FlywheelError
from flywheel.cascade import NONE_OF_THESE
from flywheel.io import read_csv, read_csv_header, write_csv, write_json
from flywheel.labeling import current_keys, ledger_verdict
from flywheel.ledger import (GOLD, REVIEW_FIELDS, STATUSES, check_review_columns, is_person_row, merge_review,
                             waits_for_person)
from flywheel.remap import MAPPED
from flywheel.report import fmt, mean
from flywheel.teacher import PROMPT_VERSION

log = logging.getLogger(__name__)

HUMAN_FIELDS = ["path", "split", "student_label", "student_conf", "llm_answers", "llm_status", "label_final",
                "source", "turn"]
LABELS_LLM_FIELDS = ["path", "llm_label", "confidence"]


class ReviewError(FlywheelError):
    """A review file a person or a spreadsheet changed into something the pipeline cannot read."""


class Answer(NamedTuple):
    """A person's answer to one image."""
    label: str            # a class, or NONE_OF_THESE
    source: str           # human | simulated_human (SIMULATED from ground truth, offline only)


class FlywheelLabel(NamedTuple):
    """One row of flywheel_labels.csv: a label a turn added, with where it came from."""
    path: str
    label: str
    source: str           # escalation | cascade | human | simulated_human | pseudo
    turn: int


def human_answers(P) -> dict:
    """{path: Answer} for human-review rows that have an answer."""
    if not P.human_review.exists():
        return {}
    return {r["path"]: Answer(r["label_final"].strip(), r.get("source") or "human")
            for r in read_csv(P.human_review) if (r.get("label_final") or "").strip()}


def label_row(path, turn, classes, person=None, machine=None, where="human_review.csv"):
    """The one rule that turns an answer into a training row. A person's answer wins over the machine's
    (label, source); "none of these" never trains; a label that is no class is an error naming the file.
    -> FlywheelLabel, or None (nothing to train on).

    >>> label_row("a.jpg", 1, ["x", "y"], Answer("y", "human"), ("x", "escalation"))
    FlywheelLabel(path='a.jpg', label='y', source='human', turn=1)
    >>> label_row("a.jpg", 1, ["x", "y"], Answer(NONE_OF_THESE, "human"), ("x", "escalation")) is None
    True
    >>> label_row("a.jpg", 1, ["x", "y"], None, ("x", "cascade")).source
    'cascade'
    """
    if person is not None:
        if person.label == NONE_OF_THESE:
            return None
        if person.label not in classes:
            raise ReviewError(f"{where}: label_final {person.label!r} for {path} is not one of {classes} or "
                              f"{NONE_OF_THESE}")
        return FlywheelLabel(path, person.label, person.source, turn)
    return None if machine is None else FlywheelLabel(path, machine[0], machine[1], turn)


def check_review_file(P):
    """A review_labels.csv a spreadsheet saved must still have the columns the pipeline reads."""
    if P.review.exists():
        try:
            check_review_columns(read_csv_header(P.review), str(P.review))
        except ValueError as e:
            raise ReviewError(str(e)) from None


def write_label_outputs(P, items, ledger, teacher, manifest, gold_report, qc, max_usd, person_gold=None,
                        budget_stopped=False, interrupted=False, rule=None):
    """labels_llm.csv, review_labels.csv (keeping what a person decided) and label_summary.json, all
    from the ledger, so a crashed, stopped or interrupted run still leaves files that match what was paid.
    person_gold: {path: label} from --gold_csv (or --gold_n's SIMULATED person, the manifest's label), written as
    status gold rows: they train as source gold or, 30 or more, calibrate the student (flywheel.training)."""
    person_gold = person_gold or {}
    vs = {it["path"]: ledger_verdict(it, teacher, ledger, qc) for it in items}
    rows = [{"path": p, "llm_label": v.label, "confidence": "" if v.confidence is None else f"{v.confidence:.4f}",
             "label_final": person_gold.get(p, v.label), "status": GOLD if p in person_gold else v.status}
            for p, v in vs.items()]
    old = read_csv(P.review) if P.review.exists() else []
    rows = merge_review(rows, old)
    kept = [o for o in old if o["path"] not in vs and is_person_row(o)]
    if kept:
        log.info("keeping %d review row(s) a person decided outside the current sample", len(kept))
    write_csv(P.review, REVIEW_FIELDS, rows + kept)
    write_csv(P.labels_llm, LABELS_LLM_FIELDS, [r for r in rows if r["llm_label"]])
    recs = ledger.calls(current_keys(items, teacher, qc))  # this model, prompt and sample only: not every line
    summary = label_summary(vs, recs, teacher, qc, {p: manifest[p]["label"] for p in vs}, gold_report, rule)
    summary.update(budget_stopped=bool(budget_stopped), interrupted=bool(interrupted), max_usd=max_usd,
                   ledger_bad_lines=ledger.bad_lines)
    write_json(P.label_summary, summary)
    if summary["estimated_accuracy"]:
        e = summary["estimated_accuracy"]
        log.info("label quality: accepted labels estimated %s accurate (95%% CI %s-%s, from %d gold pins); "
                 "measured against the manifest: %s (raw first answers %s)", fmt(e["accuracy"]), *e["ci95"],
                 rule.n_gold, fmt(summary["teacher_accuracy"]), fmt(summary["pass1_accuracy"]))
    log.info("label: %d images: %s; %d paid calls, $%.4f%s; agreement %s; teacher accuracy %s -> %s, %s, %s",
             len(vs), {s: summary[s] for s in STATUSES}, summary["calls"], summary["cost_usd"],
             " (estimated)" if summary["cost_estimated"] else "", fmt(summary["agreement_rate"]),
             fmt(summary["teacher_accuracy"]), P.review, P.labels_llm, P.label_summary)
    waiting = sum(map(waits_for_person, rows))
    if waiting:  # the rows QC doubted: unanswered they never train, answered they correct what the student would learn
        log.info("label: %d row(s) of %s wait for a person and do not train until answered: type the right class "
                 "in label_final, or approve a row as it is, then (re)run --step train (README: Correcting labels in "
                 "a spreadsheet)", waiting, P.review)
    return summary


def label_summary(vs, recs, teacher, qc, truth, gold_report, rule) -> dict:
    """label_summary.json's figures from the verdicts ({path: Verdict}) and the ledger records behind them."""
    counts = {s: sum(v.status == s for v in vs.values()) for s in STATUSES}
    paid = [r for r in recs if r.get("status") in ("ok", "invalid") and r.get("purpose") != MAPPED]
    two = [v for v in vs.values() if len(v.records) == 2]
    acc = [p for p, v in vs.items() if v.status == "accepted"]
    p1 = [(p, v.records[0]["label"]) for p, v in vs.items() if v.records]
    fitted = rule is not None and qc.second_pass in ("fitted", "model")
    estimated = any(r.get("cost_estimated") for r in paid)
    oracle = teacher.source == "oracle"
    return {
        "source": teacher.source, "simulated": oracle, "model": teacher.model, "host": teacher.host,
        "prompt_version": PROMPT_VERSION, "second_pass": qc.second_pass, "conf_thresh": qc.conf_thresh,
        "second_model": qc.second_model, "qc_rule": rule.to_json() if fitted else None,
        # the estimate judges gold under the fitted rule, so it describes the labels only when that rule is in force
        "estimated_accuracy": rule.estimate if fitted and rule.n_gold else None,
        "yield": round(counts["accepted"] / len(vs), 4) if vs else None, "requested_images": len(vs), **counts,
        "calls": len(paid), "answers_carried": sum(r.get("purpose") == MAPPED for r in recs), "calls_pass1": sum(r.get("pass") == 1 for r in paid),
        "calls_pass2": sum(r.get("pass") == 2 for r in paid),
        "calls_error": sum(r.get("status") == "error" for r in recs),
        "calls_invalid": sum(r.get("status") == "invalid" for r in recs),
        "calls_per_image": len(paid) / len(vs) if vs else 0.0,
        "calls_per_accepted": len(paid) / len(acc) if acc else None,
        "agreement_rate": mean([v.records[0]["label"] == v.records[1]["label"] for v in two]),
        "prompt_tokens": sum(int(r.get("prompt_tokens") or 0) for r in recs),
        "completion_tokens": sum(int(r.get("completion_tokens") or 0) for r in recs),
        "cost_usd": round(sum(float(r.get("cost_usd") or 0) for r in recs), 6), "cost_estimated": estimated,
        "mean_cost_per_call_usd": mean([float(r.get("cost_usd") or 0) for r in paid]),
        "mean_latency_s": mean([float(r.get("latency_s") or 0) for r in paid]),
        "teacher_accuracy": mean([vs[p].label == truth[p] for p in acc]),
        "pass1_accuracy": mean([lab == truth[p] for p, lab in p1]),
        "gold_accuracy": gold_report["accuracy"] if gold_report else None, "gold": gold_report,
        "note": ("teacher_accuracy and pass1_accuracy use the manifest's ground truth for measurement only; "
                 "it never chose a label.")
        + (" SIMULATED teacher (oracle): labels are ground truth with injected noise, costs are --usd_per_call "
           "estimates." if oracle else "")
        + (" Some costs are token-price estimates: the server reported no usage.cost." if estimated and not oracle else ""),
    }


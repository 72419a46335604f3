"""A turn's student on the official test split: accuracy, per-class figures, calibration before and after
temperature scaling, coverage at fixed precision (thresholds fitted on validation, measured on test) and,
when training made the twin, what label noise costs. -> eval.json, test_predictions.csv"""
import json

import numpy as np

from flywheel.calibrate import (classification_metrics, coverage_precision, ece, reliability_bins, softmax,
                                threshold_for_precision)
from flywheel.inference import student_probs
from flywheel.io import read_csv, write_csv, write_json
from flywheel.run import Turn, heldout_rows
from flywheel.student import load_student
from flywheel.training import calibrated_on, count_by, noise_cost

COVERAGE_TARGETS = (0.90, 0.95, 0.99)
PREDICTION_FIELDS = ["path", "true", "pred", "confidence", "probs"]


def coverage_at_precision(vp, v_labels, conf, correct) -> dict:
    """For each COVERAGE_TARGETS precision: the threshold fitted on validation probabilities vp [N, C]
    (labels v_labels), with its validation coverage, and test coverage and precision (conf, correct [M])."""
    vconf, vcorrect = vp.max(1), vp.argmax(1) == v_labels
    cov = {}
    for t in COVERAGE_TARGETS:
        tau = threshold_for_precision(vconf, vcorrect, t)
        c, prec = coverage_precision(conf, correct, tau)
        cov[f"{t:.2f}"] = {"tau": tau, "val_coverage": coverage_precision(vconf, vcorrect, tau)[0],
                           "coverage": c, "precision": prec}
    return cov


def evaluate(P, T: Turn, manifest, device) -> dict:
    """T's student on the test split -> T.eval, T.test_predictions; returns eval.json's content."""
    best = load_student(T.best)
    classes = best["classes"]
    rows = heldout_rows(manifest)
    pr = student_probs(P, rows, best, device, "eval test")
    y = np.array([classes.index(r["label"]) for r in rows])
    pred = pr.probs.argmax(1)
    p0 = softmax(pr.logits)
    conf0, conf1 = p0.max(1), pr.probs.max(1)
    vp = softmax(best["val_logits"], best["temperature"])  # thresholds come from validation only; test measures
    train_rows = read_csv(T.train_rows)
    known = [r for r in train_rows if r["path"] in manifest]  # production uploads have no ground truth
    held = "cal" if calibrated_on(train_rows) == "gold pins" else "val"  # the rows behind val_logits
    val_teacher = np.array([classes.index(r["label"]) for r in train_rows if r["split"] == held])
    m = classification_metrics(y, pred, classes)
    out = {**m, "classes": classes,
           "ece_before": ece(conf0, p0.argmax(1) == y), "ece_after": ece(conf1, pred == y),
           "temperature": best["temperature"],
           "val_ece_before": best["val_ece_before"], "val_ece_after": best["val_ece_after"],
           "coverage_at_precision": coverage_at_precision(vp, best["val_labels"], conf1, pred == y),
           "teacher_accuracy": sum(r["label"] == manifest[r["path"]]["label"] for r in known) / max(len(known), 1),
           "student_teacher_agreement": float((vp.argmax(1) == val_teacher).mean()) if len(val_teacher) else None,
           "n_train": sum(r["split"] == "train" for r in train_rows), "n_val": sum(r["split"] == "val" for r in train_rows), "n_test": len(rows),
           "calibrated_on": calibrated_on(train_rows), "n_cal": sum(r["split"] == "cal" for r in train_rows),
           "label_sources": count_by(train_rows, "source"),
           "best_epoch": best.get("best_epoch"), "best_val_acc": best["best_val_acc"],
           "student_ms_per_image": pr.ms_per_image, "device": str(device),
           "calibration_warning": best.get("calibration_warning"),
           "reliability": {"before": reliability_bins(conf0, p0.argmax(1) == y),
                           "after": reliability_bins(conf1, pred == y)},
           "notes": "teacher_accuracy: training labels vs the manifest's ground truth (measured, never used). "
                    "student_teacher_agreement: student vs teacher labels on the held-out validation split. "
                    "Thresholds in coverage_at_precision were fitted on validation, then applied to test."}
    out["noise_cost"] = noise_cost(T, pr.images, y, m["accuracy"], device)
    write_json(T.eval, out)
    write_csv(T.test_predictions, PREDICTION_FIELDS,
              [{"path": r["path"], "true": r["label"], "pred": classes[k], "confidence": f"{pr.probs[i, k]:.6f}",
                "probs": json.dumps([round(float(v), 6) for v in pr.probs[i]])} for i, (r, k) in enumerate(zip(rows, pred))])
    return out

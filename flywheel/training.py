"""Training a turn's student: the rows it trains on (with provenance), the loop (flywheel.student, DDP
under torchrun), calibration on validation, the ground-truth twin that measures what label noise costs,
and the flywheel's retraining (continued, from scratch, or both with the better one kept on validation).
"""
import json
import logging
import os
import shutil
from collections import Counter

import numpy as np

from flywheel import FlywheelError
from flywheel.inference import load_split
from flywheel.io import read_csv, read_json, write_csv
from flywheel.ledger import training_labels
from flywheel.run import Turn, better_key, record_promotion, split_of, validation_score
from flywheel.student import (ARCH, calibrate_checkpoint, dist_world, hash_split, load_checkpoint, load_student,
                              model_from_checkpoint, predict_logits, save_torch, train_student)

log = logging.getLogger(__name__)

TRAIN_ROW_FIELDS = ["path", "label", "source", "split", "turn", "weight"]
MIN_GOLD_VAL = 30  # gold pins enough to calibrate on, kept out of training (--calibrate_on auto)
TRAIN_SETTINGS = ("student", "recipe", "epochs", "batch_size", "lr", "weight_decay", "seed", "val_frac", "weights", "img_size", "device",
                  "label_weights", "calibrate_on")


class LabelsError(FlywheelError):
    """Too few usable labels, or a review file whose labels cannot train; the message says what to fix."""


def count_by(rows, key) -> dict:
    """{value: rows with it}.

    >>> count_by([{"source": "llm"}, {"source": "human"}, {"source": "llm"}], "source")
    {'llm': 2, 'human': 1}
    """
    return dict(Counter(r[key] for r in rows))


def label_weights(review, summary, how):
    """{path: training weight} for the teacher's accepted rows: the label model's probability that the label is
    right (review_labels.csv's confidence under --second_pass model), so a doubtful label pulls less; every
    other row (a person's, gold, flywheel) weighs 1. how: model | none (every row 1, hard labels only).

    >>> rows = [{"path": "a", "status": "accepted", "llm_label": "x", "label_final": "x", "confidence": "0.8"},
    ...         {"path": "b", "status": "accepted", "llm_label": "x", "label_final": "y", "confidence": "0.6"}]
    >>> label_weights(rows, {"second_pass": "model"}, "model"), label_weights(rows, {"second_pass": "fitted"}, "model")
    ({'a': 0.8}, {})
    """
    if how != "model" or summary.get("second_pass") != "model":
        return {}  # other rules' confidences are stated numbers, not probabilities of being right
    return {r["path"]: float(r["confidence"]) for r in review if (r.get("status") or "").strip() == "accepted"
            and r.get("label_final") == r.get("llm_label") and r.get("confidence")}


def validation_split(sources, keys, labels, val_frac, seed, how="auto"):
    """Indices (train, val, cal) of the label rows. val (model selection): a hash of (seed, image sha256)
    picks val_frac of the rows (flywheel.student.hash_split), so an edited label or a new image moves nothing
    else. cal (the temperature, tau, promotion's NLL, serving's drift reference): how auto, with at least
    MIN_GOLD_VAL gold pins, the gold pins, kept out of training and val; else empty (val calibrates).

    Why: the label step accepts the images its label model finds easy, so a split of the accepted labels
    overstates the student, and a temperature and tau fitted on it escalate too little. Gold pins are a
    uniform sample with true labels. They are too few to pick an epoch on (100 images: accuracy in steps of
    a point), so val still does that.
    >>> src = ["gold"] * MIN_GOLD_VAL + ["llm"] * 40
    >>> tr, va, cal = validation_split(src, [str(i) for i in range(len(src))], [0] * len(src), 0.1, 0)
    >>> cal.tolist() == list(range(MIN_GOLD_VAL)), len(tr) + len(va), min(tr.tolist() + va.tolist())
    (True, 40, 30)
    >>> len(validation_split(src, [str(i) for i in range(len(src))], [0] * len(src), 0.1, 0, "validation")[2])
    0
    """
    gold = np.array([s == "gold" for s in sources], dtype=bool)
    if how == "auto" and gold.sum() >= MIN_GOLD_VAL:
        rest = np.flatnonzero(~gold)
        tr, va = hash_split([keys[i] for i in rest], [labels[i] for i in rest], val_frac, seed)
        return rest[tr], rest[va], np.flatnonzero(gold).astype(np.int64)
    tr, va = hash_split(keys, labels, val_frac, seed)
    return tr, va, np.zeros(0, np.int64)


def calibrated_on(rows) -> str:
    """What a turn's student was calibrated on, from its training rows ({split}), for people.

    >>> calibrated_on([{"split": "cal"}, {"split": "val"}]), calibrated_on([{"split": "val"}, {"split": "train"}])
    ('gold pins', 'validation split')
    """
    return "gold pins" if any(r["split"] == "cal" for r in rows) else "validation split"


def training_rows(P, manifest, classes, val_frac, seed, upto_turn=0, weights="model", calibrate_on="auto"):
    """-> (train rows, val rows, cal rows), each {path, label, source, split, turn, weight} (weight: label_weights).

    The label step's accepted rows and a person's rows are split into train/val/cal by validation_split (a
    stable hash; the gold pins), so val and cal stay the same across flywheel turns and label edits. Flywheel labels
    (source escalation / cascade / human / simulated_human) from turns <= upto_turn go to train only;
    pseudo labels (the student's own) only from turn upto_turn itself, since each turn's student redraws them.
    """
    review = read_csv(P.need(P.review, "label"))
    summary = read_json(P.label_summary) if P.label_summary.exists() else {}
    try:
        base = training_labels(review, classes, summary.get("source", "llm"))
    except ValueError as e:
        raise LabelsError(f"{P.review}: {e}") from None
    gone = [b.path for b in base if b.path not in manifest]
    if gone:  # prep was rerun without these images: a person's row stays in the CSV, but cannot train
        log.warning("%d review row(s) name images no longer in %s (e.g. %s); they are left out of training",
                    len(gone), P.manifest, gone[0])
        base = [b for b in base if b.path in manifest]
    if len(base) < 2 * len(classes):
        raise LabelsError(f"only {len(base)} usable labels in {P.review} (accepted rows and human edits); "
                          f"label more images (--max_label) or review the rejected rows")
    tr, va, ca = validation_split([b.source for b in base], [manifest[b.path]["sha256"] for b in base],
                                  [classes.index(b.label) for b in base], val_frac, seed, calibrate_on)
    w = label_weights(review, summary, weights)
    train = [{**base[i]._asdict(), "split": "train", "turn": 0, "weight": w.get(base[i].path, 1.0)} for i in tr]
    val = [{**base[i]._asdict(), "split": "val", "turn": 0, "weight": 1.0} for i in va]
    cal = [{**base[i]._asdict(), "split": "cal", "turn": 0, "weight": 1.0} for i in ca]
    if P.flywheel_labels.exists() and upto_turn > 0:
        seen = {r["path"] for r in train + val + cal}
        for r in read_csv(P.flywheel_labels):
            if int(r["turn"]) <= upto_turn and r["path"] not in seen and (r["source"] != "pseudo" or int(r["turn"]) == upto_turn):
                train.append({**r, "split": "train", "weight": 1.0})
                seen.add(r["path"])
    leaked = [r["path"] for r in train + val + cal if split_of(manifest, r["path"]) not in ("train", "production")]
    assert not leaked, f"test images in the training data: {leaked[:5]}"
    return train, val, cal


def train_turn(cfg, P, manifest, T: Turn, turn, init, resume, device):
    """Turn `turn`'s student from review_labels.csv (+ flywheel labels up to the turn), trained from `init`
    and calibrated on the gold pins (or validation) -> T.last, T.best, T.mobilenet, T.train_rows (and the
    ground-truth twin with --measure_noise_cost). Returns the calibrated checkpoint: its val_logits, val_labels
    and val_paths are the calibration set's."""
    classes = cfg["classes"]
    T.dir.mkdir(parents=True, exist_ok=True)
    train, val, cal = training_rows(P, manifest, classes, cfg["val_frac"], cfg["seed"], upto_turn=turn,
                                    weights=cfg["label_weights"], calibrate_on=cfg["calibrate_on"])
    x_tr, y_tr = load_split(P, train, classes, "decode train")
    x_va, y_va = load_split(P, val, classes, "decode val")
    x_cal, y_cal = load_split(P, cal, classes, "decode gold pins") if cal else (x_va, y_va)
    tcfg = {k: cfg[k] for k in TRAIN_SETTINGS}
    tcfg.update(epochs=(cfg["flywheel_epochs"] or cfg["epochs"]) if turn else cfg["epochs"], turn=turn,
                out_dir=str(P.out), img_size=int(x_tr.shape[-1]),  # as prepped, not the flag
                rows={r["path"]: [r["label"], r["split"], float(r["weight"])] for r in train + val + cal})  # --resume refuses if these change
    log.info("train: %d train / %d val / %d gold pins to calibrate on, %s, device %s, init %s", len(train), len(val),
             len(cal), json.dumps(count_by(train + val + cal, "source")), device, init)
    w_tr = np.array([float(r["weight"]) for r in train], dtype=np.float32)
    best = train_student(x_tr, y_tr, x_va, y_va, classes, tcfg, T.dir, init, device, resume=resume, w_tr=w_tr)
    if dist_world()[0] != 0:
        return best  # under torchrun, rank 0 calibrates and writes; the others are done
    best["val_paths"] = [r["path"] for r in (cal or val)]
    best = calibrate_checkpoint(best, x_cal, y_cal, device, T.best)
    write_csv(T.train_rows, TRAIN_ROW_FIELDS, train + val + cal)  # the rows best.pt was trained on
    save_torch(best["model"], T.mobilenet)
    if cfg["measure_noise_cost"]:
        train_clean_twin(T, manifest, train, val, x_tr, x_va, classes, tcfg, init, device)
    else:
        shutil.rmtree(T.noise_twin, ignore_errors=True)  # a stale twin would describe other training rows
    log.info("train: best epoch %s val acc %.4f; temperature %.3f, val ECE %.4f -> %.4f; wrote %s, %s, %s",
             best.get("best_epoch"), best["best_val_acc"], best["temperature"], best["val_ece_before"],
             best["val_ece_after"], T.last, T.best, T.mobilenet)
    return best


def warn_if_turn0_retrained(P):
    """Record the promotion after turn 0 trained; later turns grown from an earlier turn 0 stay candidates."""
    p = record_promotion(P)  # over every existing turn, on validation: a later turn keeps shipping if it is better
    if len(p.candidates) > 1:
        log.warning("train: turn 0 was retrained; turns %s were grown from the earlier turn-0 student and stay "
                    "candidates (validation chose turn %d). Delete %s/turn_* to start the flywheel over.",
                    [c["turn"] for c in p.candidates if c["turn"]], p.turn, P.artifacts)


def train_clean_twin(T, manifest, train, val, x_tr, x_va, classes, tcfg, init, device):
    """The same images, epochs, init and seed, trained on the manifest's ground-truth labels into
    T.noise_twin. Eval reports its test accuracy beside the student's; the twin is never promoted,
    exported or used to choose anything."""
    shutil.rmtree(T.noise_twin, ignore_errors=True)
    # production uploads (--step serve) have no ground truth: the twin trains without them
    keep_tr = [i for i, r in enumerate(train) if r["path"] in manifest]
    train, x_tr = [train[i] for i in keep_tr], x_tr.take(keep_tr)
    y_tr = np.array([classes.index(manifest[r["path"]]["label"]) for r in train], dtype=np.int64)
    y_va = np.array([classes.index(manifest[r["path"]]["label"]) for r in val], dtype=np.int64)
    wrong = sum(manifest[r["path"]]["label"] != r["label"] for r in train + val)
    log.info("train: measuring the cost of label noise: the same %d images on ground-truth labels (%d of the "
             "training labels differ from it) -> %s", len(train) + len(val), wrong, T.noise_twin)
    return train_student(x_tr, y_tr, x_va, y_va, classes, {**tcfg, "measure_only": True}, T.noise_twin, init, device)


def noise_cost(T, x_test, y_test, student_acc, device):
    """eval.json's noise_cost section, when training made the ground-truth twin; else None."""
    if not T.noise_twin_ckpt.exists():
        return None
    twin = load_checkpoint(T.noise_twin_ckpt)
    logits = predict_logits(model_from_checkpoint(twin, device), x_test, device, twin["config"]["batch_size"])
    clean = float((logits.argmax(1) == y_test).mean())
    return {"student_accuracy": student_acc, "ground_truth_twin_accuracy": clean,
            "noise_cost_pts": round(100 * (clean - student_acc), 2),
            "note": "the same images, epochs, init and seed trained on the manifest's ground-truth labels; "
                    "measured only, it chooses nothing"}


def retrain(cfg, P, manifest, prev: Turn, T: Turn, k, device):
    """Train turn k's student into T: continued from the previous student, from turn 0's init, or both
    with the better one on validation kept (the same validation split, never test). -> what was done."""
    how = "scratch" if cfg["from_scratch"] else cfg["retrain"]
    first = load_student(P.turn0.best)
    turn0 = first["config"]["weights"]  # scratch = the init turn 0 started from
    arch = first["model_args"].get("arch", ARCH)  # every turn grows turn 0's architecture
    if arch != cfg["student"]:
        log.info("flywheel turn %d: training %s, turn 0's student (not --student %s)", k, arch, cfg["student"])
    cfg = {**cfg, "student": arch}
    inits = {"continue": str(prev.best), "scratch": turn0}
    if how != "best":
        train_turn(cfg, P, manifest, T, k, inits[how], False, device)
        return {"choice": how}
    val = {}
    for name, init in inits.items():
        cand = Turn(T.dir / f"_{name}")
        train_turn(cfg, P, manifest, cand, k, init, False, device)
        val[name] = validation_score(load_student(cand.best))
    win = max(val, key=lambda n: (better_key(val[n]), n == "continue"))  # a tie keeps continuing
    for f in (T.dir / f"_{win}").iterdir():
        dst = T.dir / f.name
        if dst.is_dir():
            shutil.rmtree(dst)
        os.replace(f, dst)
    for name in inits:
        shutil.rmtree(T.dir / f"_{name}", ignore_errors=True)
    log.info("flywheel turn %d: kept the %s student (validation accuracy / NLL: %s)", k, win,
             ", ".join(f"{n} {v['val_acc']:.4f} / {v['val_nll']:.4f}" for n, v in val.items()))
    return {"choice": win, "val_acc": val}  # {candidate: {val_acc, val_nll}}

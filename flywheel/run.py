"""The run folder: every file the steps exchange (`Paths`, with a per-turn view), which turn's student
ships (`promoted`: recomputed over every existing turn, on validation, whenever it is asked), and step
stamps: what each step's outputs were made from, so that a rerun whose inputs and settings are unchanged
does nothing and says so.

Shortcuts: a file larger than BIG_FILE (a ledger of millions of calls) is fingerprinted by its size and
modification time, not its bytes; every other file by its sha256.
"""
from flywheel import FlywheelError
import json
import logging
import os
import time
from pathlib import Path
from typing import NamedTuple

from flywheel.io import read_csv, read_json, sha256_file, write_json

log = logging.getLogger(__name__)

BIG_FILE = 64 * 2**20  # bytes; above this a file's fingerprint is its size and mtime (hashing a GB ledger takes s)


class RunError(FlywheelError):
    """A run folder that lacks what a step needs; the message names the step to run first."""


class Paths:
    """Every file the steps exchange, in one place (see ARCHITECTURE.md: the files are the interface)."""

    def __init__(self, out_dir):
        o = self.out = Path(out_dir)
        self.images, self.manifest, self.prep_json = o / "images", o / "manifest.csv", o / "prep.json"
        self.classes = o / "classes.json"
        self.ledger, self.review, self.labels_llm = o / "labels.jsonl", o / "review_labels.csv", o / "labels_llm.csv"
        self.label_summary, self.label_flags = o / "label_summary.json", o / "label_flags.csv"
        self.label_model = o / "label_model.json"
        self.escalations, self.human_review = o / "escalations.jsonl", o / "human_review.csv"
        self.flywheel_labels = o / "flywheel_labels.csv"
        self.label_merge = o / "labels_merge.json"
        self.report, self.datacard = o / "report.md", o / "datacard.md"
        self.stamps = o / "stamps"
        a = self.artifacts = o / "artifacts"
        self.flywheel, self.promoted = a / "flywheel.json", a / "promoted.json"
        self.onnx, self.ts, self.export = a / "mobilenet.onnx", a / "mobilenet.ts", a / "export.json"
        self.ood = a / "ood.npz"  # what serving sends to a person unasked (flywheel.ood), fitted at export
        self.task = o / "task.json"  # the task spec the label step asked with (flywheel.task)
        self.production_stats = o / "production_stats.jsonl"  # serving's request counts by slice (flywheel.monitor)
        self.turn0 = Turn(a)

    def turn(self, k: int) -> "Turn":
        """Turn k's artifacts: turn 0 (the label step's student) in artifacts/, turn k in artifacts/turn_k/."""
        return self.turn0 if k == 0 else Turn(self.artifacts / f"turn_{k}")

    def stamp(self, step):
        return self.stamps / f"{step}.json"

    def shard_ledger(self, i, n):
        return self.out / f"labels.shard-{i}-of-{n}.jsonl"

    def shard_ledgers(self):
        return sorted(self.out.glob("labels.shard-*-of-*.jsonl"))

    def need(self, path, step):
        if not Path(path).exists():
            raise RunError(f"{path} is missing; run `uv run cifar_distill.py --step {step} --out_dir {self.out}` first.")
        return Path(path)


class Turn:
    """One turn's student and what was measured of it, under one folder."""

    def __init__(self, d):
        d = self.dir = Path(d)
        self.last, self.best, self.mobilenet = d / "last.pt", d / "best.pt", d / "mobilenet.pt"
        self.train_rows, self.eval, self.test_predictions = d / "train_rows.csv", d / "eval.json", d / "test_predictions.csv"
        self.cascade, self.pool_predictions = d / "cascade.json", d / "pool_predictions.csv"
        self.speed = d / "speed.json"
        self.noise_twin = d / "noise_cost"  # the same training on ground-truth labels, for measuring only
        self.noise_twin_ckpt = self.noise_twin / "best_epoch.pt"


# ----------------------------------------------------------------------------- manifest and splits

def load_manifest(P) -> dict:
    """{path: manifest row} of the images prep made."""
    return {r["path"]: r for r in read_csv(P.need(P.manifest, "prep"))}


def heldout_rows(manifest) -> list:
    """The official test split, [{path, label}] in path order: measured, never trained on or chosen by."""
    return [{"path": p, "label": r["label"]} for p, r in sorted(manifest.items()) if r["split"] == "test"]


def pool_rows(P, manifest, upto_turn) -> list:
    """The production stream: training images the teacher has not labeled, minus flywheel relabels (a
    pseudo-labeled item stays: the student's own label is no answer, and the next student may doubt it)."""
    used = {r["path"] for r in read_csv(P.need(P.review, "label"))}
    if P.flywheel_labels.exists():
        used |= {r["path"] for r in read_csv(P.flywheel_labels) if int(r["turn"]) <= upto_turn and r["source"] != "pseudo"}
    return [{"path": p, "label": r["label"]} for p, r in sorted(manifest.items()) if r["split"] == "train" and p not in used]


def split_of(manifest, path) -> str:
    """train / test from the manifest; production for what --step serve stored; unknown otherwise.

    >>> split_of({"a.jpg": {"split": "test"}}, "a.jpg"), split_of({}, "production/x.jpg"), split_of({}, "b.jpg")
    ('test', 'production', 'unknown')
    """
    if path in manifest:
        return manifest[path]["split"]
    return "production" if path.startswith("production/") else "unknown"


def item(P, manifest, path) -> dict:
    """What the teacher is asked about one image: {path, file, sha256}."""
    return {"path": path, "file": str(P.out / path), "sha256": manifest[path]["sha256"]}


def prep_sharpens(P, default: bool) -> bool:
    """Whether prep sharpened this run's images (prep.json), which the exported graph must repeat."""
    settings = read_json(P.prep_json).get("settings", {}) if P.prep_json.exists() else {}
    return settings.get("sharpen", default)


# ----------------------------------------------------------------------------- promotion

def validation_score(best) -> dict:
    """A student's score on the run's one validation split: accuracy, then calibrated NLL, which breaks the
    ties a small validation split makes common (20 images: accuracy moves in steps of 5 points)."""
    from flywheel.calibrate import nll
    return {"val_acc": float(best["best_val_acc"]),
            "val_nll": round(nll(best["val_logits"], best["val_labels"], best["temperature"]), 6)}


def better_key(score):
    """Sort key: higher validation accuracy, then lower validation NLL.

    >>> sorted([{"val_acc": .9, "val_nll": .30}, {"val_acc": .9, "val_nll": .25}, {"val_acc": .8, "val_nll": .1}],
    ...        key=better_key)[-1]
    {'val_acc': 0.9, 'val_nll': 0.25}
    """
    return score.get("val_acc", -1.0), -score.get("val_nll", float("inf"))


def choose_turn(candidates) -> int:
    """The turn to ship among [{turn, val_acc, val_nll}]: best on validation, the earliest on a full tie.
    The test split never chooses (it is not an input).

    >>> choose_turn([{"turn": 0, "val_acc": .8}, {"turn": 1, "val_acc": .9}, {"turn": 2, "val_acc": .9}])
    1
    """
    return max(candidates, key=lambda t: (better_key(t), -t["turn"]))["turn"]


class Promotion(NamedTuple):
    turn: int
    dir: Path             # that turn's artifacts folder
    candidates: list      # [{turn, val_acc, val_nll}] over every existing turn


def turns_on_disk(P) -> list:
    """Turn 0 when it has a student, and every turn the flywheel recorded whose student is still there."""
    turns = [0] if P.turn0.best.exists() else []
    if P.flywheel.exists():
        turns += [t["turn"] for t in read_json(P.flywheel)["turns"] if t["turn"] > 0 and P.turn(t["turn"]).best.exists()]
    return sorted(set(turns))


def promoted(P) -> Promotion:
    """The promoted student, recomputed over every existing turn from its own checkpoint (never from a file
    that could be stale or deleted). Without any trained student: turn 0, no candidates."""
    from flywheel.student import load_student
    cands = [{"turn": k, **validation_score(load_student(P.turn(k).best))} for k in turns_on_disk(P)]
    k = choose_turn(cands) if cands else 0
    return Promotion(k, P.turn(k).dir, cands)


def promoted_artifacts(out_dir):
    """-> (artifacts folder of the run's promoted student, its turn). Export, report, the speed test,
    breakeven, serving and the cascade all read the student from here."""
    p = promoted(Paths(out_dir))
    return p.dir, p.turn


def record_promotion(P) -> Promotion:
    """Recompute the promotion and write it to artifacts/promoted.json, a record for people: nothing reads
    the turn back from it."""
    p = promoted(P)
    best = next((c for c in p.candidates if c["turn"] == p.turn), {})
    write_json(P.promoted, {"turn": p.turn, "dir": p.dir.relative_to(P.artifacts).as_posix(),
                            "val_acc": best.get("val_acc"), "val_nll": best.get("val_nll"), "candidates": p.candidates,
                            "rule": "highest validation accuracy over every existing turn, then lowest validation NLL "
                                    "(same validation split); the test split never chooses"})
    return p


# ----------------------------------------------------------------------------- step stamps

def file_fingerprint(path):
    """sha256 of a file, size and mtime for one over BIG_FILE, a listing for a folder, None when missing."""
    path = Path(path)
    if path.is_dir():
        return tree_fingerprint(path)
    if not path.is_file():
        return None
    st = path.stat()
    return f"size={st.st_size} mtime_ns={st.st_mtime_ns}" if st.st_size > BIG_FILE else sha256_file(path)


def tree_fingerprint(root):
    """A folder's files by relative path, size and mtime (a data source: hashing every image would take
    longer than prep's own check of what changed)."""
    import hashlib
    h = hashlib.sha256()
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            st = os.stat(os.path.join(d, f))
            h.update(f"{os.path.relpath(os.path.join(d, f), root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return "tree:" + h.hexdigest()


def fingerprint(files, settings, root) -> dict:
    """What a step's outputs are made from: each file's fingerprint (named relative to the run folder `root`,
    so a copied or moved run keeps its stamps) and the settings that shape them.

    >>> fingerprint([], {"epochs": 3}, ".")
    {'files': {}, 'settings': {'epochs': 3}}
    """
    def name(f):
        f = Path(f)
        return f.relative_to(root).as_posix() if f.is_relative_to(root) else str(f)
    return {"files": {name(f): file_fingerprint(f) for f in files},
            "settings": json.loads(json.dumps(settings, default=str))}


def unchanged(P, step, fp) -> dict:
    """The stamp of the step's last complete run when fp equals it, else None."""
    path = P.stamp(step)
    if not path.exists():
        return None
    try:
        old = read_json(path)
    except ValueError:
        return None
    return old if {k: old.get(k) for k in fp} == fp else None


def write_stamp(P, step, fp):
    write_json(P.stamp(step), {**fp, "step": step, "at": time.strftime("%Y-%m-%dT%H:%M:%S")})



def step_files(P, step, data_root=None, gold_csv=None) -> list:
    """The files a step reads and writes (its outputs are fingerprinted too: a deleted or edited output makes
    the step run again). data_root: prep's source; gold_csv: the label step's hand-checked labels."""
    if step == "prep":
        return [P.manifest, P.prep_json, P.classes] + ([Path(data_root)] if data_root else [])
    if step == "label":
        return [P.manifest, P.ledger, P.review, P.labels_llm, P.label_summary, P.label_flags, P.label_model] + ([Path(gold_csv)] if gold_csv else [])
    t0 = P.turn0
    labels = [P.manifest, P.review, P.label_summary]
    served = [P.label_flags, P.flywheel_labels, P.human_review, P.escalations, P.ledger]
    if step == "train":
        return labels + [t0.best, t0.last, t0.mobilenet, t0.train_rows, t0.noise_twin_ckpt]
    if step == "eval":
        return [P.manifest, t0.best, t0.train_rows, t0.noise_twin_ckpt, t0.eval, t0.test_predictions]
    if step == "flywheel":
        return labels + served + [t0.best, t0.eval, t0.cascade, P.flywheel]
    ship = P.turn(promoted(P).turn)
    if step == "cascade":
        return labels + served + [ship.best, ship.cascade, ship.pool_predictions]
    if step == "export":
        return [P.manifest, P.prep_json, ship.best, ship.train_rows, P.onnx, P.ts, P.export, P.ood]
    if step == "report":
        return [P.prep_json, P.label_summary, P.flywheel, P.export, ship.best, ship.eval, ship.cascade, ship.speed,
                P.report, P.datacard]
    raise ValueError(f"no stamp for step {step!r}")


def run_task(cfg):
    """--task, or the spec the run's label step recorded (so every later step asks the same question), or None."""
    from flywheel.cli import flag_error
    from flywheel.task import TaskError, check_classes, load_task, recorded_task
    try:
        task = load_task(cfg["task"]) if cfg["task"] else recorded_task(Paths(cfg["out_dir"]).task)
        if task is not None:
            check_classes(task, cfg["classes"])
    except TaskError as e:
        flag_error("task", str(e))
    return task


def run_classes(cfg) -> list:
    """The classes from --classes or the data; later steps follow what prep made unless --classes is given."""
    from flywheel.cli import flag_error
    from flywheel.prep import resolve_classes
    made = Paths(cfg["out_dir"]).classes
    classes = resolve_classes(cfg["classes"], cfg["dataset"], cfg["data_root"], made)
    if cfg["step"] not in ("prep", "all") and made.exists():
        prepped = read_json(made)
        if cfg["classes"] is None:
            return prepped
        if classes != prepped:
            flag_error("classes", f"is {classes} but prep made {prepped} ({made}); rerun --step prep with these "
                                  f"--classes first, or drop the flag")
    return classes

"""The append-only JSONL ledger of teacher calls, per-image QC verdicts, and the review CSV round trip.

One line per finished call, flushed as written (fsynced on close), so `kill -9` loses at most the
calls in flight. A call is keyed by (image sha256, pass, model, question hash), where the question hash
covers the rendered prompt (system and user text, so the class list and its order) and the sampling
parameters: a rerun re-asks nothing that already has a valid answer to the same question, and a new
model, prompt or class list asks again under new keys while old records stay. Records written before
the question hash existed (prompt version v1) are re-keyed on load from their own class_order and
temperature, so nothing already paid for is lost. A truncated last line (a crash mid-write) is skipped
with a warning.
"""
import logging
import time
from collections import defaultdict

from flywheel.io import JsonlAppender

log = logging.getLogger(__name__)

LEDGER_VERSION = 2
REVIEW_FIELDS = ["path", "llm_label", "confidence", "label_final", "status"]
REVIEW_REQUIRED = ["path", "llm_label", "label_final", "status"]
STATUSES = ["accepted", "disagreed", "low_confidence", "flagged", "invalid", "failed"]  # flagged: confident learning
APPROVED, GOLD = "approved", "gold"  # statuses a person sets (approve a row as it is) or --gold_csv sets


def call_key(sha256, pass_no, model, question) -> str:
    """The ledger key of one answer: the image, the pass, the model and the question asked.

    >>> call_key("ab12", 2, "m/x", "q9")
    'ab12|2|m/x|q9'
    """
    return f"{sha256}|{int(pass_no)}|{model}|{question}"


def _rekey_legacy(rec):
    """A v1 record keyed by prompt version gets the key its question would have today."""
    from flywheel.teacher import question_hash
    if "question" in rec or rec.get("prompt_version") != "v1" or "class_order" not in rec:
        return rec
    q = question_hash(rec["class_order"], rec.get("temperature", 0.0))
    return {**rec, "question": q, "key": call_key(rec["sha256"], rec["pass"], rec["model"], q)}


class Ledger:
    """labels.jsonl: read once, then appended to under a lock by many worker threads."""

    def __init__(self, path):
        self._ok = {}                                     # key -> latest ok record
        self._n = defaultdict(lambda: defaultdict(int))   # key -> status -> count
        self._file = JsonlAppender(path, lambda r: isinstance(r, dict) and "key" in r)
        self.path, self.bad_lines = self._file.path, self._file.bad_lines
        self.records = []
        for rec in self._file.records:
            self._index(_rekey_legacy(rec))

    def _index(self, rec):
        self.records.append(rec)
        self._n[rec["key"]][rec.get("status")] += 1
        if rec.get("status") == "ok":
            self._ok[rec["key"]] = rec

    def append(self, rec: dict) -> dict:
        rec = {"v": LEDGER_VERSION, "ts": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **rec}
        return self._file.append(rec, on_written=self._index)

    def close(self):
        self._file.close()

    def ok(self, key):
        return self._ok.get(key)

    def count(self, key, status) -> int:
        return self._n[key][status]

    def total_cost(self, purposes=None) -> float:
        return sum(float(r.get("cost_usd") or 0) for r in self.records
                   if purposes is None or r.get("purpose") in purposes)

    def max_cost_per_call(self, model) -> float:
        """The dearest paid call this model has cost so far (0 if none): the budget reserves at least this."""
        return max((float(r.get("cost_usd") or 0) for r in self.records
                    if r.get("model") == model and r.get("status") in ("ok", "invalid")), default=0.0)


# ----------------------------------------------------------------------------- QC verdicts

def image_verdict(p1, p2, second_needed: bool, conf_thresh: float, p1_invalid=0, p2_invalid=0, pair_thresh=None):
    """Combine one image's pass records (ok records or None) into (status, label, confidence).
    A single answer is accepted at confidence >= conf_thresh; an agreeing pair at mean confidence >=
    pair_thresh (default conf_thresh).

    >>> image_verdict({"label": "a", "confidence": 0.9}, {"label": "a", "confidence": 0.7}, True, 0.7)
    ('accepted', 'a', 0.8)
    >>> image_verdict({"label": "a", "confidence": 0.9}, {"label": "b", "confidence": 0.9}, True, 0.7)[0]
    'disagreed'
    >>> image_verdict({"label": "a", "confidence": 0.95}, None, False, 0.7)
    ('accepted', 'a', 0.95)
    """
    if p1 is None:
        return ("invalid" if p1_invalid else "failed"), "", None
    if second_needed and p2 is None:
        return ("invalid" if p2_invalid else "failed"), p1["label"], p1["confidence"]
    if not second_needed:
        c = float(p1["confidence"])
        return ("accepted" if c >= conf_thresh else "low_confidence"), p1["label"], c
    conf = round((float(p1["confidence"]) + float(p2["confidence"])) / 2, 6)
    if p1["label"] != p2["label"]:
        # report the more confident pass's label; it is not accepted either way
        lab = p1["label"] if p1["confidence"] >= p2["confidence"] else p2["label"]
        return "disagreed", lab, conf
    pair_thresh = conf_thresh if pair_thresh is None else pair_thresh
    return ("accepted" if conf >= pair_thresh else "low_confidence"), p1["label"], conf


# ----------------------------------------------------------------------------- review CSV round trip

def check_review_columns(rows_or_header, path="review_labels.csv"):
    """Fail naming a required column a spreadsheet lost. Accepts the header list or rows (dicts).

    >>> check_review_columns(["status", "label_final", "path", "llm_label", "notes"])
    >>> check_review_columns(["path", "label_final", "status"])
    Traceback (most recent call last):
    ...
    ValueError: review_labels.csv has no column 'llm_label' (found: path, label_final, status). It needs path, llm_label, label_final, status; restore the column (labels_llm.csv has llm_label per path), or delete the file to regenerate it from the ledger (edits in it are then lost)
    """
    header = list(rows_or_header[0]) if rows_or_header and isinstance(rows_or_header[0], dict) else list(rows_or_header)
    if not header:
        return
    missing = [c for c in REVIEW_REQUIRED if c not in header]
    if missing:
        raise ValueError(f"{path} has no column {missing[0]!r} (found: {', '.join(header)}). It needs "
                         f"{', '.join(REVIEW_REQUIRED)}; restore the column (labels_llm.csv has llm_label per path), "
                         f"or delete the file to regenerate it from the ledger (edits in it are then lost)")


def is_person_row(r) -> bool:
    """A row a person decided: label_final edited away from the teacher, approved as it is, or gold.

    >>> [is_person_row(r) for r in ({"llm_label": "a", "label_final": "b", "status": "disagreed"},
    ...                             {"llm_label": "a", "label_final": "a", "status": "approved"},
    ...                             {"llm_label": "a", "label_final": "a", "status": "disagreed"})]
    [True, True, False]
    """
    status = (r.get("status") or "").strip().lower()
    return ((r.get("label_final") or "").strip() != (r.get("llm_label") or "").strip()) or status in (APPROVED, GOLD)


def merge_review(new_rows, old_rows):
    """Keep what a person decided: where an old row's label_final differs from its llm_label, or its
    status says approved (or gold), its label_final and status stay.

    >>> old = [{"path": "x", "llm_label": "a", "label_final": "b"}, {"path": "y", "llm_label": "a", "label_final": "a"},
    ...        {"path": "z", "llm_label": "a", "label_final": "a", "status": "Approved"}]
    >>> new = [{"path": p, "llm_label": "c", "label_final": "c", "status": "disagreed"} for p in "xyz"]
    >>> [(r["label_final"], r["status"]) for r in merge_review(new, old)]
    [('b', 'disagreed'), ('c', 'disagreed'), ('a', 'approved')]
    """
    old = {r["path"]: r for r in old_rows}
    out = []
    for r in new_rows:
        o = old.get(r["path"])
        r = dict(r)
        if o is not None and is_person_row(o):
            r["label_final"] = (o.get("label_final") or "").strip()
            status = (o.get("status") or "").strip().lower()
            if status in (APPROVED, GOLD):
                r["status"] = status
        out.append(r)
    return out


def training_labels(review_rows, classes, teacher_source: str):
    """Review rows -> [(path, label, source)]: accepted rows, plus every row a person decided.

    A non-empty label_final is the label used. Source: 'gold' for --gold_csv rows, 'human' where a person
    edited label_final or set status 'approved' (approving a disagreed or low-confidence row as it is),
    else the teacher's. Raises ValueError naming the row when label_final is not a class.
    >>> training_labels([{"path": "p", "llm_label": "a", "label_final": "a", "status": "accepted"},
    ...                  {"path": "q", "llm_label": "a", "label_final": "b", "status": "disagreed"},
    ...                  {"path": "r", "llm_label": "a", "label_final": "a", "status": "disagreed"},
    ...                  {"path": "s", "llm_label": "b", "label_final": "b", "status": "approved"},
    ...                  {"path": "t", "llm_label": "a", "label_final": "b", "status": "gold"}], ["a", "b"], "llm")
    [('p', 'a', 'llm'), ('q', 'b', 'human'), ('s', 'b', 'human'), ('t', 'b', 'gold')]
    """
    check_review_columns(review_rows)
    out = []
    for i, r in enumerate(review_rows):
        final = (r.get("label_final") or "").strip()
        if not final:
            continue
        if final not in classes:
            raise ValueError(f"review row {i + 2} ({r['path']}): label_final {final!r} is not one of {classes}; "
                             f"fix or empty it")
        status = (r.get("status") or "").strip().lower()
        if status == GOLD:
            out.append((r["path"], final, "gold"))
        elif is_person_row(r):
            out.append((r["path"], final, "human"))
        elif status == "accepted":
            out.append((r["path"], final, teacher_source))
    return out

"""The append-only JSONL ledger of teacher calls, per-image QC verdicts, and the review CSV round trip.

One line per finished call, flushed as written (fsynced on close), so `kill -9` loses at most the
calls in flight. A call is keyed by (image sha256, pass, model, prompt version): a rerun re-asks nothing that
already has a valid answer under the same key, and a new model or prompt version asks again under new
keys while old records stay. A truncated last line (a crash mid-write) is skipped with a warning.
"""
import logging
import time
from collections import defaultdict

from flywheel.io import JsonlAppender

log = logging.getLogger(__name__)

LEDGER_VERSION = 1
REVIEW_FIELDS = ["path", "llm_label", "confidence", "label_final", "status"]
STATUSES = ["accepted", "disagreed", "low_confidence", "invalid", "failed"]


def call_key(sha256, pass_no, model, prompt_version) -> str:
    return f"{sha256}|{int(pass_no)}|{model}|{prompt_version}"


class Ledger:
    """labels.jsonl: read once, then appended to under a lock by many worker threads."""

    def __init__(self, path):
        self._ok = {}                                     # key -> latest ok record
        self._n = defaultdict(lambda: defaultdict(int))   # key -> status -> count
        self._file = JsonlAppender(path, lambda r: isinstance(r, dict) and "key" in r)
        self.path, self.bad_lines = self._file.path, self._file.bad_lines
        self.records = []
        for rec in self._file.records:
            self._index(rec)

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


# ----------------------------------------------------------------------------- QC verdicts

def image_verdict(p1, p2, second_needed: bool, conf_thresh: float, p1_invalid=0, p2_invalid=0):
    """Combine one image's pass records (ok records or None) into (status, label, confidence).

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
    return ("accepted" if conf >= conf_thresh else "low_confidence"), p1["label"], conf


# ----------------------------------------------------------------------------- review CSV round trip

def merge_review(new_rows, old_rows):
    """Keep a person's edits: where an old row's label_final differs from its llm_label, it stays.

    >>> old = [{"path": "x", "llm_label": "a", "label_final": "b"}, {"path": "y", "llm_label": "a", "label_final": "a"}]
    >>> new = [{"path": "x", "llm_label": "c", "label_final": "c"}, {"path": "y", "llm_label": "c", "label_final": "c"}]
    >>> [r["label_final"] for r in merge_review(new, old)]
    ['b', 'c']
    """
    old = {r["path"]: r for r in old_rows}
    out = []
    for r in new_rows:
        o = old.get(r["path"])
        r = dict(r)
        if o is not None and (o.get("label_final") or "") != (o.get("llm_label") or ""):
            r["label_final"] = o.get("label_final") or ""
        out.append(r)
    return out


def training_labels(review_rows, classes, teacher_source: str):
    """Review rows -> [(path, label, source)]: accepted rows, plus any row a person edited.

    A non-empty label_final is the label used; source is 'human' where it differs from llm_label.
    Raises ValueError naming the row when label_final is not a class.
    >>> training_labels([{"path": "p", "llm_label": "a", "label_final": "a", "status": "accepted"},
    ...                  {"path": "q", "llm_label": "a", "label_final": "b", "status": "disagreed"},
    ...                  {"path": "r", "llm_label": "a", "label_final": "a", "status": "disagreed"}], ["a", "b"], "llm")
    [('p', 'a', 'llm'), ('q', 'b', 'human')]
    """
    out = []
    for i, r in enumerate(review_rows):
        final = (r.get("label_final") or "").strip()
        if not final:
            continue
        if final not in classes:
            raise ValueError(f"review row {i + 2} ({r['path']}): label_final {final!r} is not one of {classes}; "
                             f"fix or empty it")
        edited = final != (r.get("llm_label") or "")
        if edited:
            out.append((r["path"], final, "human"))
        elif r.get("status") == "accepted":
            out.append((r["path"], final, teacher_source))
    return out

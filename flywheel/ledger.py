"""The append-only JSONL ledger of teacher calls, its index, shard merging, and the review CSV round trip.

One line per finished call, flushed as written (fsynced on close), so `kill -9` loses at most the
calls in flight. A call is keyed by (image sha256, pass, model, question hash), where the question hash
covers the rendered prompt (system and user text, so the class list and its order) and the sampling
parameters: a rerun re-asks nothing that already has a valid answer to the same question, and a new
model, prompt or class list asks again under new keys while old records stay. Records written before
the question hash existed (prompt version v1) are re-keyed on load from their own class_order and
temperature, so nothing already paid for is lost. A truncated last line (a crash mid-write) is skipped
with a warning.

labels.jsonl is the record (a person reads and greps it); labels.index.sqlite beside it is an index
derived from it: one row per line with the key and the small fields (status, label, confidence, cost,
tokens, latency), never the raw reply, plus how many bytes of the JSONL it covers. Opening a ledger
indexes only the lines past that point (all of them the first time, or when the JSONL no longer starts
as the index remembers), so a 2M-record ledger opens in milliseconds and the process holds SQLite's page
cache, not 2M dicts. Why SQLite and not a JSONL index read into memory: lookups, sums and counts run in
SQLite without loading anything, WAL lets a reader open while a writer appends, and it ships with Python.
Each append writes the JSONL line first, then its index row; a kill between the two loses only that
row, which the next open indexes from the JSONL. Deleting the index is always safe.
"""
import hashlib
import json
import logging
import sqlite3
import threading
import time
from typing import NamedTuple

from flywheel.io import Closing, JsonlAppender, iter_jsonl

log = logging.getLogger(__name__)

LEDGER_VERSION = 2
INDEX_VERSION = 2
CLAIM_SLOTS = 1024  # lock files a key's claim may take: a collision only makes two keys wait for each other
HEAD_BYTES = 4096  # the index remembers a hash of the JSONL's first bytes: a replaced file is reindexed
REVIEW_FIELDS = ["path", "llm_label", "confidence", "label_final", "status"]
REVIEW_REQUIRED = ["path", "llm_label", "label_final", "status"]
STATUSES = ["accepted", "disagreed", "low_confidence", "flagged", "invalid", "failed"]  # flagged: confident learning
APPROVED, GOLD = "approved", "gold"  # statuses a person sets (approve a row as it is) or --gold_csv sets
# the small fields the index keeps per call: what QC, costs and summaries read (never raw or why)
INDEX_FIELDS = ["key", "status", "pass", "model", "purpose", "source", "path", "sha256", "label", "confidence",
                "label_logprob", "cost_usd", "cost_estimated", "latency_s", "prompt_tokens", "completion_tokens", "http_status", "ts"]


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


def _is_call(rec):
    return isinstance(rec, dict) and "key" in rec


def index_path(ledger_path):
    from pathlib import Path
    p = Path(ledger_path)
    return p.with_name(p.name.replace(".jsonl", "") + ".index.sqlite")


def claims_path(ledger_path):
    from pathlib import Path
    p = Path(ledger_path)
    return p.with_name(p.name.replace(".jsonl", "") + ".claims")


class Claims:
    """One claim per ledger key across threads and processes, so two processes that want the same answer at the
    same moment pay for it once: the first holds the claim while it asks; the second waits, then finds the answer
    in the ledger. A claim is an exclusive flock on one of CLAIM_SLOTS empty files in labels.claims/, picked by the
    key's hash (two keys may share a file: they then wait for each other, never pay twice), through a descriptor
    of its own, so threads of one process exclude each other as processes do (POSIX record locks would not: they
    belong to the process, and the kernel reports threads waiting on each other's bytes as a deadlock). The kernel
    drops a dead process's flocks: kill -9 leaves no stale claim.

    >>> import tempfile, os; c = Claims(os.path.join(tempfile.mkdtemp(), "labels.claims"))
    >>> with c.hold("ab12|1|m|q"):
    ...     sorted(os.listdir(c.dir)) == [f"{c.slot('ab12|1|m|q')}"]
    True
    """

    def __init__(self, path):
        from pathlib import Path
        self.dir = Path(path)

    @staticmethod
    def slot(key) -> int:
        return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % CLAIM_SLOTS

    def hold(self, key):
        import contextlib
        import fcntl
        import os

        @contextlib.contextmanager
        def held():
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir / str(self.slot(key)), os.O_CREAT | os.O_RDWR, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # drops the flock
        return held()


def head_hash(path, n) -> str:
    """sha256 of a file's first n bytes: whether a file is still the one an index or a merge saw."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(n)).hexdigest()


class Ledger(Closing):
    """labels.jsonl, appended to under a lock by many worker threads, looked up through its SQLite index."""

    def __init__(self, path):
        self._file = JsonlAppender(path, _is_call, load=False)
        self.path, self.bad_lines = self._file.path, 0
        self._lock = threading.RLock()                     # the writer connection
        self._local, self._readers = threading.local(), []  # one reader connection per thread
        # autocommit: each append's index row commits alone (WAL, no fsync), so no write lock is ever held
        # between calls and another process or Ledger can open the index at any time
        self._db = sqlite3.connect(index_path(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=30000")
        self._claims = Claims(claims_path(self.path))
        self._catch_up()
        # total_now: the ledger's total as of the last line summed, and that line's end (rows past it are new,
        # whoever appended them: the index is shared by every process on the folder)
        self._total, self._summed_to = self.total_cost(), int(self._meta("covered") or 0)

    # --------------------------------------------------------------- the index
    def _schema(self, reset):
        db = self._db
        if reset:
            db.execute("DROP TABLE IF EXISTS calls")
            db.execute("DROP TABLE IF EXISTS meta")
        cols = ", ".join(f"{c} {'TEXT' if c in ('key', 'status', 'model', 'purpose', 'source', 'path', 'sha256', 'label', 'ts') else 'REAL'}"
                         for c in INDEX_FIELDS)
        db.execute(f"CREATE TABLE IF NOT EXISTS calls (end_offset INTEGER PRIMARY KEY, {cols})")
        db.execute("CREATE INDEX IF NOT EXISTS calls_key ON calls(key, status)")
        db.execute("CREATE INDEX IF NOT EXISTS calls_sha ON calls(sha256)")
        db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT)")

    def _meta(self, k):
        row = self._db.execute("SELECT v FROM meta WHERE k = ?", (k,)).fetchone()
        return row[0] if row else None

    def _state(self, size):
        """-> bytes of the JSONL the index covers (0: rebuild it), and whether the index is usable as is."""
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"calls", "meta"} <= tables or self._meta("version") != str(INDEX_VERSION):
            return 0, False
        covered, head_n = int(self._meta("covered") or 0), int(self._meta("head_n") or 0)
        if covered > size or (covered and self._meta("head") != head_hash(self.path, head_n)):
            log.warning("%s does not match %s (the ledger was replaced or cut): rebuilding the index",
                        index_path(self.path), self.path)
            return 0, False
        return covered, covered == size

    def _catch_up(self):
        """Index the JSONL lines the index does not cover yet; rebuild it when it describes another file."""
        size = self.path.stat().st_size if self.path.exists() else 0
        covered, current = self._state(size)
        if not current:
            self._db.execute("BEGIN IMMEDIATE")  # one indexer at a time across processes
            try:
                covered, current = self._state(size)  # another process may have done it meanwhile
                if not current:
                    self._schema(reset=covered == 0)
                    self._index_from(covered)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        self.bad_lines = int(self._meta("bad_lines") or 0)
        self._head_n = int(self._meta("head_n") or 0)

    def _index_from(self, start):
        t0, rows, bad, end = time.monotonic(), [], int(self._meta("bad_lines") or 0) if start else 0, start
        for rec, end in iter_jsonl(self.path, start, _is_call, "index labels.jsonl", bar_from_bytes=64 << 20):
            if rec is None:
                bad += 1
                log.warning("%s: a line ending at byte %d is not a complete record (a crash mid-write?); "
                            "skipped", self.path, end)
                continue
            rows.append(self._row(_rekey_legacy(rec), end))
            if len(rows) >= 10000:
                self._insert(rows)
                rows = []
        self._insert(rows)
        head_n = min(end, HEAD_BYTES)
        self._set_meta(covered=end, bad_lines=bad, head=head_hash(self.path, head_n), head_n=head_n, version=INDEX_VERSION)
        if end - start > (64 << 20):
            log.info("indexed %.0f MB of %s in %.1fs", (end - start) / 2**20, self.path, time.monotonic() - t0)

    @staticmethod
    def _row(rec, end):
        return (end, *[rec.get(c) if not isinstance(rec.get(c), (dict, list)) else json.dumps(rec.get(c))
                       for c in INDEX_FIELDS])

    def _insert(self, rows):
        if rows:
            self._db.executemany(f"INSERT OR IGNORE INTO calls VALUES ({', '.join('?' * (len(INDEX_FIELDS) + 1))})", rows)

    def _set_meta(self, **kv):
        self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, str(v)) for k, v in kv.items()])

    def _written(self, rec, end):
        """After a line reached the JSONL (under its flock): index every line up to it, ours and any that another
        process appended since we last looked (a server beside a flywheel turn), in one commit."""
        with self._lock:
            self._catch_up()

    def total_now(self) -> float:
        """What every call in the ledger cost, as of the last refresh or append: only rows past the last one summed
        are read (a range of the index's primary key), so a budget can ask it before every call."""
        with self._lock:
            got, end = self._db.execute("SELECT COALESCE(SUM(cost_usd), 0), MAX(end_offset) FROM calls "
                                        "WHERE end_offset > ?", (self._summed_to,)).fetchone()
            if end is not None:
                self._total, self._summed_to = self._total + float(got), int(end)
            return self._total

    def refresh(self):
        """See what other processes appended since (their answers, their spend)."""
        with self._lock:
            self._catch_up()

    def claim(self, key):
        """Hold `key` (threads and processes alike) while deciding whether to pay for it: see Claims."""
        return self._claims.hold(key)

    def _query(self, sql, args=()):
        """Reads go through a connection of the calling thread's own (WAL readers run beside the writer,
        and every append has committed, so a thread sees its own and every earlier append)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = sqlite3.connect(index_path(self.path), check_same_thread=False)
            db.execute("PRAGMA query_only = 1")
            with self._lock:
                self._readers.append(db)
        return db.execute(sql, args).fetchall()

    # --------------------------------------------------------------- the API
    def append(self, rec: dict) -> dict:
        rec = {"v": LEDGER_VERSION, "ts": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **rec}
        return self._file.append(rec, on_written=self._written)

    def close(self):
        self._file.close()
        with self._lock:
            for db in self._readers:
                db.close()
            self._readers.clear()
            self._local = threading.local()
            if self._db is not None:
                self._db.close()
                self._db = None

    def ok(self, key):
        """The latest valid answer under key, as a dict of INDEX_FIELDS, or None."""
        rows = self._query(f"SELECT {', '.join(INDEX_FIELDS)} FROM calls WHERE key = ? AND status = 'ok' "
                           f"ORDER BY end_offset DESC LIMIT 1", (key,))
        return _as_record(rows[0]) if rows else None

    def answers(self, keys) -> dict:
        """{key: (latest valid answer or None, number of invalid replies)} for a few keys, in one query
        (QC verdicts read both passes of an image at once)."""
        keys = list(keys)
        rows = self._query(f"SELECT end_offset, {', '.join(INDEX_FIELDS)} FROM calls WHERE key IN "
                           f"({', '.join('?' * len(keys))}) AND status IN ('ok', 'invalid') ORDER BY end_offset", keys)
        out = {k: (None, 0) for k in keys}
        for r in rows:
            rec = _as_record(r[1:])
            ok, n_invalid = out[rec["key"]]
            out[rec["key"]] = (rec, n_invalid) if rec["status"] == "ok" else (ok, n_invalid + 1)
        return out

    def count(self, key, status) -> int:
        return self._query("SELECT COUNT(*) FROM calls WHERE key = ? AND status = ?", (key, status))[0][0]

    def calls(self, keys) -> list:
        """Every record (INDEX_FIELDS dicts) under these keys, in ledger order."""
        keys, out = list(keys), []
        for i in range(0, len(keys), 500):
            part = keys[i:i + 500]
            out += self._query(f"SELECT end_offset, {', '.join(INDEX_FIELDS)} FROM calls WHERE key IN "
                               f"({', '.join('?' * len(part))})", part)
        return [_as_record(r[1:]) for r in sorted(out)]

    def cost_of(self, shas) -> float:
        """USD recorded for calls about these images (sha256s)."""
        shas, total = list(shas), 0.0
        for i in range(0, len(shas), 500):
            part = shas[i:i + 500]
            total += self._query(f"SELECT COALESCE(SUM(cost_usd), 0) FROM calls WHERE sha256 IN "
                                 f"({', '.join('?' * len(part))})", part)[0][0]
        return total

    def total_cost(self, purposes=None) -> float:
        if purposes is None:
            return float(self._query("SELECT COALESCE(SUM(cost_usd), 0) FROM calls")[0][0])
        purposes = list(purposes)
        return float(self._query(f"SELECT COALESCE(SUM(cost_usd), 0) FROM calls WHERE purpose IN "
                                 f"({', '.join('?' * len(purposes))})", purposes)[0][0])

    def max_cost_per_call(self, model) -> float:
        """The dearest paid call this model has cost so far (0 if none): the budget reserves at least this."""
        return float(self._query("SELECT COALESCE(MAX(cost_usd), 0) FROM calls WHERE model = ? AND status IN "
                                 "('ok', 'invalid')", (model,))[0][0])

    def paid_means(self, model):
        """(paid calls, mean USD per call, mean latency in s) for this model's ok and invalid calls (an answer
        carried by --label_map, purpose 'mapped', was not paid again)."""
        n, cost, lat = self._query("SELECT COUNT(*), AVG(COALESCE(cost_usd, 0)), AVG(COALESCE(latency_s, 0)) FROM "
                                   "calls WHERE model = ? AND status IN ('ok', 'invalid') AND purpose != 'mapped'", (model,))[0]
        return n, cost or 0.0, lat or 0.0

    def shas_with(self, purpose, pass_no) -> set:
        """The images (sha256) with an ok answer of this purpose and pass, under any question."""
        return {r[0] for r in self._query("SELECT sha256 FROM calls WHERE purpose = ? AND pass = ? AND status = 'ok'",
                                          (purpose, int(pass_no)))}

    def __len__(self):
        return self._query("SELECT COUNT(*) FROM calls")[0][0]


class Merged(NamedTuple):
    added: int         # calls appended to the ledger
    duplicates: int    # answers skipped: the ledger already answers their key
    bad_lines: int     # lines that were not complete records (a crash mid-write)
    state: dict        # {"bytes": merged up to, "head": sha256 of the first bytes}: where the next merge starts


def merge_ledger_file(ledger, path, state=None) -> Merged:
    """Append the calls of another ledger file (a shard's) to `ledger`, from where `state` says the last
    merge of that file stopped. An answer (status ok) to a key the ledger already answers is skipped;
    every other record is kept (failed and invalid calls were paid for too). Each kept record gains
    merged_from (the file's name)."""
    from pathlib import Path
    path = Path(path)
    size = path.stat().st_size
    head = head_hash(path, HEAD_BYTES)
    start = int((state or {}).get("bytes", 0))
    if state and (state.get("head") != head or start > size):
        log.warning("%s is not the file merged before (it was replaced): merging it from the start; answers "
                    "already in the ledger are still skipped", path)
        start = 0
    added = dup = bad = 0
    end = start
    for rec, end in iter_jsonl(path, start, _is_call, f"merge {path.name}"):
        if rec is None:
            bad += 1
            continue
        rec = _rekey_legacy(rec)
        if rec.get("status") == "ok" and ledger.ok(rec["key"]) is not None:
            dup += 1
            continue
        ledger.append({**rec, "merged_from": path.name})
        added += 1
    return Merged(added, dup, bad, {"bytes": end, "head": head})


def _as_record(row) -> dict:
    rec = dict(zip(INDEX_FIELDS, row))
    if rec["pass"] is not None:
        rec["pass"] = int(rec["pass"])
    for c in ("prompt_tokens", "completion_tokens", "http_status"):
        if rec[c] is not None:
            rec[c] = int(rec[c])
    rec["cost_estimated"] = bool(rec["cost_estimated"])
    return rec


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



def waits_for_person(r) -> bool:
    """A row the label step did not accept and no person has decided: it never trains until someone answers it.

    >>> [waits_for_person(r) for r in ({"llm_label": "a", "label_final": "a", "status": "low_confidence"},
    ...                                {"llm_label": "a", "label_final": "a", "status": "accepted"},
    ...                                {"llm_label": "a", "label_final": "b", "status": "disagreed"})]
    [True, False, False]
    """
    return (r.get("status") or "").strip().lower() != "accepted" and not is_person_row(r)

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


class Label(NamedTuple):
    """A label the review file gives one image, with where it came from."""
    path: str
    label: str
    source: str           # the teacher's source (llm | oracle), human, or gold


def training_labels(review_rows, classes, teacher_source: str):
    """Review rows -> [Label]: accepted rows, plus every row a person decided.

    A non-empty label_final is the label used. Source: 'gold' for --gold_csv rows, 'human' where a person
    edited label_final or set status 'approved' (approving a disagreed or low-confidence row as it is),
    else the teacher's. Raises ValueError naming the row when label_final is not a class.
    >>> training_labels([{"path": "p", "llm_label": "a", "label_final": "a", "status": "accepted"},
    ...                  {"path": "q", "llm_label": "a", "label_final": "b", "status": "disagreed"},
    ...                  {"path": "r", "llm_label": "a", "label_final": "a", "status": "disagreed"},
    ...                  {"path": "s", "llm_label": "b", "label_final": "b", "status": "approved"},
    ...                  {"path": "t", "llm_label": "a", "label_final": "b", "status": "gold"}], ["a", "b"], "llm")
    [Label(path='p', label='a', source='llm'), Label(path='q', label='b', source='human'), Label(path='s', label='b', source='human'), Label(path='t', label='b', source='gold')]
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
            out.append(Label(r["path"], final, "gold"))
        elif is_person_row(r):
            out.append(Label(r["path"], final, "human"))
        elif status == "accepted":
            out.append(Label(r["path"], final, teacher_source))
    return out

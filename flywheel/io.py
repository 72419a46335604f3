"""Small file helpers shared by every step: atomic writes, CSV/JSON round trips, hashing.

Every file a step writes is either append-only (ledgers) or written to a temp name in the same folder
and renamed into place, so a crash never leaves a half-written file that looks complete. Files get the
permissions the user's umask gives (mkstemp alone would leave them 0600).

RunLock: one process at a time may spend through a run folder (fcntl.flock on OUT/run.lock; the
kernel drops it when the holder dies, even by kill -9).
"""
from flywheel import FlywheelError
import csv
import hashlib
import json
import os
import signal
import tempfile
import threading
from pathlib import Path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_current_umask()  # what open() would give a new file


def atomic_write_bytes(path, data: bytes):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path, text: str):
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_csv(path, fieldnames, rows):
    """Atomic CSV write; rows are dicts (missing keys -> empty)."""
    import io
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fieldnames, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    atomic_write_text(path, buf.getvalue())


def read_csv(path):
    """Rows as dicts; a UTF-8 BOM and CRLF line endings (a spreadsheet's save) are fine, and header
    names are stripped of surrounding spaces."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        r = csv.DictReader(f)
        if r.fieldnames:
            r.fieldnames = [(h or "").strip() for h in r.fieldnames]
        return list(r)


def read_csv_header(path) -> list:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return [(h or "").strip() for h in next(csv.reader(f), [])]


def hash_file(path, algo="sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path) -> str:
    return hash_file(path, "sha256")


def read_jsonl(path, is_record=lambda r: isinstance(r, dict)):
    """-> (complete records, bad line count, whether the file ends in a torn line). A line that is not
    a record (a crash mid-write) is skipped with a warning; a missing file is empty."""
    import logging
    path = Path(path)
    if not path.exists():
        return [], 0, False
    data = path.read_bytes()
    records, bad = [], 0
    for i, line in enumerate(data.split(b"\n")):
        if not line.strip():
            continue
        rec = _parse_record(line, is_record)
        if rec is None:
            bad += 1
            logging.getLogger(__name__).warning(
                "%s line %d is not a complete record (a crash mid-write?); skipped", path, i + 1)
            continue
        records.append(rec)
    return records, bad, bool(data) and not data.endswith(b"\n")


def _parse_record(line: bytes, is_record):
    """One JSONL line -> its record, or None when it is not JSON or not a record (a crash mid-write).

    >>> _parse_record(b'{"a": 1}', lambda r: "a" in r), _parse_record(b'{"a": 1', lambda r: True)
    ({'a': 1}, None)
    """
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if is_record(rec) else None


def iter_jsonl(path, start=0, is_record=lambda r: isinstance(r, dict), desc=None, bar_from_bytes=0):
    """The complete lines of a JSONL file from byte offset `start`, as (record, end): end is the byte
    offset just past the line, record is None for a line that is not a record (a crash mid-write).
    Blank lines are skipped; it stops before a torn last line (no newline), which a later read picks
    up once it is finished. A tqdm bar (in bytes) shows when at least bar_from_bytes are left to read."""
    from tqdm import tqdm
    path = Path(path)
    size = path.stat().st_size
    end = start
    with open(path, "rb") as f, tqdm(total=size - start, unit="B", unit_scale=True, leave=False, desc=desc,
                                     disable=desc is None or size - start < bar_from_bytes) as bar:
        f.seek(start)
        for line in f:
            if not line.endswith(b"\n"):
                return
            end += len(line)
            bar.update(len(line))
            if not line.strip():
                continue
            yield _parse_record(line, is_record), end


class JsonlAppender:
    """An append-only JSONL file shared by threads: `records` are the complete lines already there
    (a torn line from a crash is skipped and counted in `bad_lines`), `append` writes and flushes one
    more. Flushed lines survive kill -9 (they are in the OS page cache); close() also fsyncs.
    load=False reads nothing (a caller that indexes the file itself, like the ledger); `records` is then
    empty. on_written(rec, end) gets the byte offset just past the new line."""

    def __init__(self, path, is_record=lambda r: isinstance(r, dict), load=True):
        import threading
        self.path = Path(path)
        if load:
            self.records, self.bad_lines, torn = read_jsonl(self.path, is_record)
        else:
            self.records, self.bad_lines, torn = [], 0, _ends_torn(self.path)
        self._lock = threading.Lock()
        if torn:
            with open(self.path, "ab") as f:  # our appends start on a fresh line
                f.write(b"\n")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # unbuffered: each line is one write(2) on an O_APPEND descriptor, readable for the torn-line check
        self._f = open(self.path, "a+b", buffering=0)

    def append(self, rec: dict, on_written=None) -> dict:
        """One line, written whole under an exclusive flock, so appends from another process (a server beside a
        flywheel turn) never interleave with ours; a torn line another process left is closed first."""
        import fcntl
        line = (json.dumps(rec, ensure_ascii=False, default=_json_default) + "\n").encode("utf-8")
        with self._lock:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX)
            try:
                end = os.fstat(self._f.fileno()).st_size
                if end and os.pread(self._f.fileno(), 1, end - 1) != b"\n":
                    line = b"\n" + line  # a writer died mid-line: ours starts on a fresh one
                os.write(self._f.fileno(), line)
                if on_written is not None:
                    on_written(rec, os.lseek(self._f.fileno(), 0, os.SEEK_CUR))
            finally:
                fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)
        return rec

    def close(self):
        if not self._f.closed:
            os.fsync(self._f.fileno())
            self._f.close()


def _ends_torn(path) -> bool:
    """Whether a file ends in a line with no newline (a crash mid-write)."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def stable_unit(*parts) -> float:
    """A reproducible number in [0, 1) from any values, independent of PYTHONHASHSEED.

    >>> round(stable_unit("abc", 1), 6) == round(stable_unit("abc", 1), 6)
    True
    """
    h = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


class Closing:
    """`with X(...) as x:` closes x on the way out, whatever happened (ledgers, logs, teacher clients)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class FileLock:
    """An exclusive flock on PATH.lock while the `with` block runs, across threads and processes: for a file
    two processes read, change and rewrite whole (human_review.csv, written by the server and the cascade).

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "x.csv"
    >>> with FileLock(p):
    ...     p.write_text("a")
    1
    """

    _thread_locks: dict = {}
    _guard = threading.Lock()

    def __init__(self, path):
        self.path = Path(str(path) + ".lock")
        with FileLock._guard:  # flock is per open file, not per thread: threads take a lock of their own first
            self._tlock = FileLock._thread_locks.setdefault(str(self.path.resolve()), threading.Lock())

    def __enter__(self):
        import fcntl
        self._tlock.acquire()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a")
        fcntl.flock(self._f.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self._f.close()  # drops the flock
        self._tlock.release()


class RunLockHeld(FlywheelError):
    """Another live process holds the run folder's lock; the message names it and the fix."""


class RunLock:
    """An exclusive, non-blocking flock on OUT/run.lock for as long as the `with` block runs. The file
    says who holds it (pid, step, start time), so a second run can name the holder.

    >>> import tempfile; d = tempfile.mkdtemp()
    >>> with RunLock(d, "label"):
    ...     try:
    ...         RunLock(d, "cascade").acquire()
    ...     except RunLockHeld as e:
    ...         print(str(e).split(" (")[0])
    another cifar_distill process holds the run folder's lock
    """

    def __init__(self, out_dir, step):
        self.path = Path(out_dir) / "run.lock"
        self.step, self._f = step, None

    def acquire(self):
        import fcntl
        import time
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            pid = holder.split()[0] if holder != "unknown" else "?"
            raise RunLockHeld(
                f"another cifar_distill process holds the run folder's lock ({holder}; {self.path}); two "
                f"processes on one run folder would pay for the same answers twice. Wait for it to finish, stop it "
                f"(kill {pid}), or use another --out_dir.") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()} step={self.step} since={time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        f.flush()
        self._f = f
        return self

    def release(self):
        if self._f is not None:
            self._f.close()  # closing drops the flock; the file stays (deleting it would race a waiter)
            self._f = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


class SigtermAsInterrupt:
    """SIGTERM (what `kill` and process managers send) stops a step the way Ctrl-C does."""

    def __enter__(self):
        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGTERM, self._raise)

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)

"""Dual-pass QC labeling over a teacher, a ledger and a budget: the one code path that spends money.

The label step, the cascade and the flywheel all call `label_items`, so an answer paid for once is
reused everywhere (the ledger key does not include why it was asked).

Pass 1 lists the classes in the given order at temperature 0; pass 2 lists them in another order at
a temperature above 0, so that agreement between the passes means something.
"""
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

from tqdm import tqdm

from flywheel.io import stable_unit
from flywheel.ledger import call_key, image_verdict
from flywheel.teacher import PROMPT_VERSION, FatalTeacherError, pass_class_order

log = logging.getLogger(__name__)


class Budget:
    """Hard USD cap: a call may start only if spend + calls in flight + this call cannot pass it.

    >>> b = Budget(max_usd=1.0, spent=0.5, est_per_call=0.2)
    >>> b.reserve(), b.reserve(), b.reserve()
    (True, True, False)
    >>> b.settle(0.1); round(b.spent, 3)
    0.6
    """

    def __init__(self, max_usd, spent, est_per_call):
        self.max_usd, self.spent, self.est = float(max_usd), float(spent), float(est_per_call)
        self.inflight, self.calls, self.run_spent, self.stopped = 0, 0, 0.0, False
        self._lock = threading.Lock()

    def reserve(self) -> bool:
        with self._lock:
            if self.spent + (self.inflight + 1) * self.est > self.max_usd + 1e-12:
                self.stopped = True
                return False
            self.inflight += 1
            return True

    def settle(self, cost):
        with self._lock:
            self.inflight -= 1
            self.spent += float(cost or 0)
            self.run_spent += float(cost or 0)
            self.calls += 1
            # learn the real price: the estimate never drops below what calls have cost on average
            if self.calls >= 5:
                self.est = max(self.est, self.run_spent / self.calls)


class QC:
    """Acceptance policy shared by label, cascade and flywheel."""

    def __init__(self, classes, conf_thresh=0.7, second_pass="always", adaptive_thresh=0.9, audit_frac=0.1,
                 second_temp=0.7, max_invalid=2, seed=0):
        self.classes, self.conf_thresh, self.second_pass = list(classes), conf_thresh, second_pass
        self.adaptive_thresh, self.audit_frac, self.second_temp = adaptive_thresh, audit_frac, second_temp
        self.max_invalid, self.seed = max_invalid, seed

    def second_needed(self, sha, p1_conf) -> bool:
        if self.second_pass == "always":
            return True
        audited = stable_unit(self.seed, "audit", sha) < self.audit_frac
        return p1_conf < self.adaptive_thresh or audited


def ledger_verdict(item, teacher, ledger, qc):
    """(status, label, confidence, [pass records]) for one image from the ledger alone."""
    keys = [call_key(item["sha256"], p, teacher.model, PROMPT_VERSION) for p in (1, 2)]
    p1, p2 = ledger.ok(keys[0]), ledger.ok(keys[1])
    need2 = p1 is not None and qc.second_needed(item["sha256"], float(p1["confidence"]))
    st, lab, conf = image_verdict(p1, p2, need2, qc.conf_thresh,
                                  ledger.count(keys[0], "invalid"), ledger.count(keys[1], "invalid"))
    return st, lab, conf, [r for r in (p1, p2 if need2 else None) if r is not None]


def _ask(item, pass_no, teacher, ledger, qc, budget, purpose, stop):
    """Ask one pass until it has a valid answer, within the invalid-reply bound. -> ok record or None."""
    key = call_key(item["sha256"], pass_no, teacher.model, PROMPT_VERSION)
    if (rec := ledger.ok(key)) is not None:
        return rec
    order = pass_class_order(qc.classes, pass_no, item["sha256"])
    temp = 0.0 if pass_no == 1 else qc.second_temp
    while ledger.count(key, "invalid") <= qc.max_invalid:
        if stop.is_set() or not budget.reserve():
            return None
        try:
            a = teacher.ask(item["path"], item["file"], item["sha256"], pass_no, order, temp)
        except BaseException:
            budget.settle(0.0)
            raise
        budget.settle(a.cost_usd)
        rec = ledger.append({
            "key": key, "path": item["path"], "sha256": item["sha256"], "pass": pass_no,
            "model": teacher.model, "host": teacher.host, "prompt_version": PROMPT_VERSION,
            "source": teacher.source, "purpose": purpose, "status": a.status, "label": a.label,
            "confidence": a.confidence, "why": a.why, "raw": a.raw, "error": a.error,
            "http_status": a.http_status, "prompt_tokens": a.prompt_tokens,
            "completion_tokens": a.completion_tokens, "cost_usd": a.cost_usd,
            "cost_estimated": a.cost_estimated, "latency_s": round(a.latency_s, 4),
            "temperature": temp, "class_order": order})
        if a.status == "ok":
            return rec
        if a.status == "error":
            return None  # transport retries already happened inside the client; a rerun tries again
    return None


def label_items(items, teacher, ledger, qc, budget, purpose, max_workers=10, desc="label", on_done=None):
    """Run dual-pass QC on items ({path, file, sha256}); every call goes through the ledger.

    Returns {path: (status, label, confidence, pass records)}; on_done(item, verdict) runs in the main
    thread as each item finishes (the cascade logs escalations there, so a kill loses nothing).
    Raises FatalTeacherError (after letting calls in flight finish and land in the ledger) on 401/402/403.
    """
    stop = threading.Event()
    fatal = []
    t0 = time.monotonic()
    calls0 = budget.calls

    def work(item):
        if stop.is_set():
            return item
        try:
            p1 = _ask(item, 1, teacher, ledger, qc, budget, purpose, stop)
            if p1 is not None and qc.second_needed(item["sha256"], float(p1["confidence"])):
                _ask(item, 2, teacher, ledger, qc, budget, purpose, stop)
        except FatalTeacherError as e:
            fatal.append(e)
            stop.set()
        return item

    out = {}
    accepted = 0
    with ThreadPoolExecutor(max_workers=max_workers) as ex, \
            tqdm(total=len(items), desc=desc, unit="img") as bar:
        futs = [ex.submit(work, it) for it in items]
        for f in as_completed(futs):
            it = f.result()
            v = ledger_verdict(it, teacher, ledger, qc)
            out[it["path"]] = v
            if on_done is not None:
                on_done(it, v)
            accepted += v[0] == "accepted"
            rate = (budget.calls - calls0) / max(time.monotonic() - t0, 1e-9)
            bar.set_postfix(accepted=accepted, usd=f"{budget.spent:.4f}", calls_s=f"{rate:.1f}", refresh=False)
            bar.update(1)
    if fatal:
        raise fatal[0]
    if budget.stopped:
        log.warning("budget stop: spend $%.4f of --max_usd $%.2f; no new calls started. Rerun with a higher "
                    "--max_usd to resume where this stopped.", budget.spent, budget.max_usd)
    return out

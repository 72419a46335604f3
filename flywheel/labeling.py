"""Dual-pass QC labeling over a teacher, a ledger and a budget: the one code path that spends money.

The label step, the cascade and the flywheel all call `label_items`, so an answer paid for once is
reused everywhere (the ledger key does not include why it was asked).

Pass 1 lists the classes in the given order at temperature 0; pass 2 lists them in another order at
a temperature above 0, so that agreement between the passes means something.

Work runs in a bounded window (at most 2 x max_workers images queued or in flight, so a million-image
pool is never submitted up front) on daemon threads. On Ctrl-C, SIGTERM, a fatal teacher error or an
unexpected exception in a worker, nothing new starts: queued images are dropped, calls in flight get
INTERRUPT_GRACE_S seconds to land in the ledger, and the exception goes up to the step, which rewrites
its outputs from what was paid.
"""
import logging
import queue
import random
import threading
import time
from typing import NamedTuple

from tqdm import tqdm

from flywheel import FlywheelError
from flywheel.io import read_csv, stable_unit, write_json
from flywheel.labelmodel import evidence_of, fit_label_model, prior_model
from flywheel.ledger import call_key
from flywheel.quality import fit_rule, flag_cuts, gold_check, gold_pins, held_out_scores, score, write_flags
from flywheel.teacher import PROMPT_VERSION, FatalTeacherError, pass_class_order, question_hash

log = logging.getLogger(__name__)

INTERRUPT_GRACE_S = 10.0  # after Ctrl-C, how long calls already sent may take to land in the ledger


class Budget:
    """Hard USD cap: a call may start only if spend + calls in flight + this call cannot pass it, each
    call reserved at the higher of the estimate and the dearest price observed (from the ledger and from
    the first answers of this run), so a 20x low --usd_per_call overshoots by at most the calls in flight.

    >>> b = Budget(max_usd=1.0, spent=0.5, est_per_call=0.2)
    >>> b.reserve(), b.reserve(), b.reserve()
    (True, True, False)
    >>> b.settle(0.1); round(b.spent, 3)
    0.6
    >>> b = Budget(max_usd=1.0, spent=0.0, est_per_call=0.01)   # the real price is 40x the estimate
    >>> [b.reserve() for _ in range(3)], b.settle(0.4), b.reserve()  # 0.4 spent + 2 in flight + 1 at 0.4 > 1
    ([True, True, True], None, False)
    """

    def __init__(self, max_usd, spent, est_per_call, known_price=0.0, ledger=None):
        self.max_usd, self.spent = float(max_usd), float(spent)
        # with the ledger, each reservation first reads what other processes on the folder paid (a server beside
        # a turn: one budget); their calls still in flight are not seen, so the overshoot stays at most the
        # calls in flight, now across both processes
        self.ledger, self._seen = ledger, (ledger.total_now() if ledger is not None else 0.0)
        self.est = max(float(est_per_call), float(known_price or 0.0))
        self.inflight, self.calls, self.run_spent, self.stopped = 0, 0, 0.0, False
        self._own_unseen = 0.0  # our settled spend the ledger may not show yet
        self._lock = threading.Lock()

    def reserve(self) -> bool:
        if self.ledger is not None:
            self.ledger.refresh()
            now = self.ledger.total_now()
            with self._lock:  # the ledger's growth, less our own settled calls it now holds: others' spend
                delta, self._seen = now - self._seen, now
                self.spent += max(0.0, delta - self._own_unseen)
                self._own_unseen = max(0.0, self._own_unseen - delta)
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
            self._own_unseen += float(cost or 0)
            self.calls += 1
            self.est = max(self.est, float(cost or 0))  # learn the real price from the first answer


class GoldError(FlywheelError):
    """A --gold_csv row the run cannot use, or more gold than the sample; the message names the row."""


class GoldGateError(FlywheelError):
    """The teacher's accuracy on gold items is below --min_gold_acc: labeling stopped before the rest."""


class BudgetStop(FlywheelError):
    """--max_usd is spent: what was paid for is kept, and a rerun with a higher cap labels the rest."""


class Verdict(NamedTuple):
    """QC's verdict on one image, from the ledger alone."""
    status: str           # accepted | disagreed | low_confidence | invalid | failed | flagged
    label: str            # the label QC would keep ("" when there is no answer)
    confidence: object    # float, or None without an answer
    records: list         # the pass records behind it (ok ledger records, pass 1 first)


class Call(NamedTuple):
    """One question to the teacher about one image: its ledger key and what is sent."""
    key: str
    pass_no: int
    class_order: list
    temperature: float
    question: str
    model: str


# the QC settings' defaults, in one place: the command line's table (cifar_distill.OPTIONS) reads them here
QC_DEFAULTS = {"conf_thresh": 0.7, "second_pass": "model", "adaptive_thresh": 0.9, "audit_frac": 0.1,
               "second_temp": 0.7, "max_invalid": 2}


class QC:
    """Acceptance policy shared by label, cascade and flywheel.

    second_pass: model (the label model fitted on gold pins from every signal decides accept / ask once more /
    review, see flywheel.labelmodel) | fitted (the previous default: second call below a stated-confidence
    threshold fitted on gold pins, see flywheel.quality; accepted pairs need only agree) | always | adaptive
    (second call below adaptive_thresh). Gold items always get both answers. second_model, when set, answers
    pass 2 (its errors overlap less than a second sample of the same model).
    """

    def __init__(self, classes, conf_thresh=QC_DEFAULTS["conf_thresh"], second_pass=QC_DEFAULTS["second_pass"],
                 adaptive_thresh=QC_DEFAULTS["adaptive_thresh"], audit_frac=QC_DEFAULTS["audit_frac"],
                 second_temp=QC_DEFAULTS["second_temp"], max_invalid=QC_DEFAULTS["max_invalid"], seed=0,
                 second_model=None):
        self.classes, self.conf_thresh, self.second_pass = list(classes), conf_thresh, second_pass
        self.adaptive_thresh, self.audit_frac, self.second_temp = adaptive_thresh, audit_frac, second_temp
        self.max_invalid, self.seed, self.second_model = max_invalid, seed, second_model
        self.threshold = float("inf")  # fitted mode: set by fit_rule on gold; inf = every image gets pass 2
        self.always_second = set()     # gold shas: both answers, so the rule can be fitted and audited
        self.flagged = set()           # shas whose first answer the held-out model contradicts: to review, no pass 2
        self.label_model = prior_model(self.classes)  # model mode: replaced by the label step's fit
        self.held_out = {}             # model mode: {sha: the held-out model's probability of the first answer}
        self.task = None               # flywheel.task.Task: part of every question's hash

    def call(self, sha, pass_no, model) -> Call:
        """The question pass `pass_no` asks about image `sha`, keyed by what is actually sent."""
        order = pass_class_order(self.classes, pass_no, sha)
        temp = 0.0 if pass_no == 1 else self.second_temp
        model = (self.second_model or model) if pass_no == 2 else model
        q = question_hash(order, temp, task=self.task)
        return Call(call_key(sha, pass_no, model, q), pass_no, order, temp, q, model)

    def second_needed(self, sha, p1) -> bool:
        """p1: the first answer's ledger record (or its stated confidence, for the confidence rules)."""
        if self.second_pass == "always" or sha in self.always_second:
            return True
        if self.second_pass == "model":
            return self.label_model.second_helps(evidence_of(p1, self.held_out.get(sha)))
        p1_conf = float(p1["confidence"]) if isinstance(p1, dict) else float(p1)
        if sha in self.flagged:
            return False  # a second answer cannot clear a flag (T=0 errors repeat): a person decides
        audited = stable_unit(self.seed, "audit", sha) < self.audit_frac
        if self.second_pass == "adaptive":
            return p1_conf < self.adaptive_thresh or audited
        return score(p1_conf, sha, self.seed) < self.threshold or audited

    def calls_needed(self, items, model, ledger):
        """(fewest, most) calls still needed for items ({sha256}), from what the ledger already holds."""
        lo = hi = 0
        for it in items:
            p1 = ledger.ok(self.call(it["sha256"], 1, model).key)
            p2 = ledger.ok(self.call(it["sha256"], 2, model).key)
            if p1 is None:
                # a second call is certain under always, for gold items, and under fitted with no gold to fit
                sure = (self.second_pass == "always" or it["sha256"] in self.always_second
                        or (self.second_pass == "fitted" and not self.always_second))
                lo, hi = lo + 1 + sure, hi + 2
            elif p2 is None and self.second_needed(it["sha256"], p1):
                lo, hi = lo + 1, hi + 1
        return lo, hi

    def thresholds(self):
        """(accept a first answer alone at confidence, accept an agreeing pair at mean confidence). Under
        fitted, an image with no second answer scored above the threshold, so it is accepted alone."""
        if self.second_pass == "fitted":
            return 0.0, 0.0
        return self.conf_thresh, self.conf_thresh


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


def model_verdict(lm, p1, p2, need2, held_out=None, p1_invalid=0, p2_invalid=0):
    """The label model's verdict on one image: (status, label, P(label right)). An agreeing pair or a single
    answer is accepted when the model's probability reaches its threshold; a disagreeing pair never is.

    >>> from flywheel.labelmodel import prior_model
    >>> lm = prior_model(["a", "b"])                      # stated priors, threshold 0.7
    >>> model_verdict(lm, {"label": "a", "confidence": 0.95}, None, False)
    ('accepted', 'a', 0.887065)
    >>> model_verdict(lm, {"label": "a", "confidence": 0.6}, {"label": "b", "confidence": 0.9}, True)[0]
    'disagreed'
    """
    if p1 is None:
        return ("invalid" if p1_invalid else "failed"), "", None
    if need2 and p2 is None:
        return ("invalid" if p2_invalid else "failed"), p1["label"], p1["confidence"]
    p = lm.p_final(evidence_of(p1, held_out, p2))
    if p2 is not None and p2["label"] != p1["label"]:
        return "disagreed", (p1 if p1["confidence"] >= p2["confidence"] else p2)["label"], round(p, 6)
    return ("accepted" if p >= lm.threshold else "low_confidence"), p1["label"], round(p, 6)


def ledger_verdict(item, teacher, ledger, qc) -> Verdict:
    """QC's verdict on one image from the ledger alone."""
    keys = [qc.call(item["sha256"], p, teacher.model).key for p in (1, 2)]
    got = ledger.answers(keys)
    (p1, invalid1), (p2, invalid2) = got[keys[0]], got[keys[1]]
    need2 = p1 is not None and qc.second_needed(item["sha256"], p1)
    if qc.second_pass == "model":
        st, lab, conf = model_verdict(qc.label_model, p1, p2 if need2 else None, need2, qc.held_out.get(item["sha256"]),
                                      invalid1, invalid2)
        return Verdict(st, lab, conf, [r for r in (p1, p2 if need2 else None) if r is not None])
    single_at, pair_at = qc.thresholds()
    st, lab, conf = image_verdict(p1, p2, need2, single_at, invalid1, invalid2, pair_thresh=pair_at)
    if p1 is not None and item["sha256"] in qc.flagged and item["sha256"] not in qc.always_second:
        st = "flagged"  # the held-out model confidently contradicts this label: never silently kept
    return Verdict(st, lab, conf, [r for r in (p1, p2 if need2 else None) if r is not None])


def current_keys(items, teacher, qc):
    """Every ledger key the current model, prompt and QC would use for these items (both passes)."""
    return {qc.call(it["sha256"], p, teacher.model).key for it in items for p in (1, 2)}


def _ask(item, pass_no, teacher, ledger, qc, budget, purpose, stop):
    """Ask one pass until it has a valid answer, within the invalid-reply bound. -> ok record or None."""
    call = qc.call(item["sha256"], pass_no, teacher.model)
    if (rec := ledger.ok(call.key)) is not None:
        return rec
    with ledger.claim(call.key):  # a server and a turn on one folder: whoever claims first pays, the other reads it
        ledger.refresh()
        if (rec := ledger.ok(call.key)) is not None:
            return rec
        return _pay(item, pass_no, call, teacher, ledger, qc, budget, purpose, stop)


def _pay(item, pass_no, call, teacher, ledger, qc, budget, purpose, stop):
    """Ask until a valid answer, within the invalid-reply bound, each answer appended. -> ok record or None."""
    while ledger.count(call.key, "invalid") <= qc.max_invalid:
        if stop.is_set() or not budget.reserve():
            return None
        try:
            a = teacher.ask(item["path"], item["file"], item["sha256"], pass_no, call.class_order, call.temperature,
                            model=call.model)
        except BaseException:
            budget.settle(0.0)
            raise
        budget.settle(a.cost_usd)
        if a.status == "error" and stop.is_set() and not a.http_status:
            return None  # never sent (stopped before a retry): nothing to record
        rec = ledger.append({
            "key": call.key, "path": item["path"], "sha256": item["sha256"], "pass": pass_no,
            "model": call.model, "host": teacher.host, "prompt_version": PROMPT_VERSION,
            "question": call.question, "source": teacher.source, "purpose": purpose, "status": a.status,
            "label": a.label, "confidence": a.confidence, "why": a.why, "raw": a.raw, "error": a.error,
            "http_status": a.http_status, "prompt_tokens": a.prompt_tokens,
            "completion_tokens": a.completion_tokens, "label_logprob": a.label_logprob, "cost_usd": a.cost_usd,
            "cost_estimated": a.cost_estimated, "latency_s": round(a.latency_s, 4),
            "temperature": call.temperature, "class_order": call.class_order})
        if a.status == "ok":
            return rec
        if a.status == "error":
            return None  # transport retries already happened inside the client; a rerun tries again
    return None


def ask_item(it, teacher, ledger, qc, budget, purpose, stop, first_only=False):
    """Both passes QC needs for one image ({path, file, sha256}), each answered from the ledger when it
    can be; the serving endpoint calls this once per escalated request."""
    p1 = _ask(it, 1, teacher, ledger, qc, budget, purpose, stop)
    if p1 is not None and not first_only and qc.second_needed(it["sha256"], p1):
        _ask(it, 2, teacher, ledger, qc, budget, purpose, stop)


class _Pool:
    """Daemon worker threads fed one item at a time: a process that must exit (Ctrl-C, after the grace)
    is never held up by a call still waiting on the network, as ThreadPoolExecutor's exit join would."""

    def __init__(self, fn, n, stop):
        self.todo, self.done, self.stop = queue.Queue(), queue.Queue(), stop
        for i in range(n):
            threading.Thread(target=self._loop, args=(fn,), daemon=True, name=f"teacher-{i}").start()
        self.n = n

    def _loop(self, fn):
        while (it := self.todo.get()) is not None:
            try:
                self.done.put((it, fn(it), None))
            except BaseException as e:
                self.stop.set()  # at once, before this thread takes the next item; then the main thread hears
                self.done.put((it, None, e))

    def submit(self, it):
        self.todo.put(it)

    def get(self, timeout):
        return self.done.get(timeout=timeout)

    def close(self):
        for _ in range(self.n):
            self.todo.put(None)


def label_items(items, teacher, ledger, qc, budget, purpose, max_workers=10, desc="label", on_done=None,
                grace_s=INTERRUPT_GRACE_S, first_only=False):
    """Run dual-pass QC on items ({path, file, sha256}); every call goes through the ledger.

    first_only: ask pass 1 only (the label step asks every first answer before it decides, with the
    held-out model, which images need a second); returns {} then.
    Returns {path: (status, label, confidence, pass records)}; on_done(item, verdict) runs in the main
    thread as each item finishes (the cascade logs escalations there, so a kill loses nothing).
    Raises FatalTeacherError on 401/402/403 or a dead endpoint, a worker's unexpected exception, or the
    KeyboardInterrupt (Ctrl-C, SIGTERM) that arrived, after dropping queued items and letting calls in
    flight land in the ledger (at most grace_s seconds).
    """
    stop = getattr(teacher, "stop", None) or threading.Event()
    stop.clear()
    t0, calls0 = time.monotonic(), budget.calls
    out, errors = {}, []
    counts = {"accepted": 0, "failed": 0}

    def work(it):
        if stop.is_set():
            return False
        ask_item(it, teacher, ledger, qc, budget, purpose, stop, first_only)
        return True

    pool = _Pool(work, max_workers, stop)
    todo, pending = iter(items), 0

    def feed():
        nonlocal pending
        while pending < 2 * max_workers and not stop.is_set() and (it := next(todo, None)) is not None:
            pool.submit(it)
            pending += 1

    bar = tqdm(total=len(items), desc=desc, unit="img", disable=not items)  # nothing to ask: no empty bar
    try:
        feed()
        while pending:
            try:
                it, ran, err = pool.get(timeout=0.2)
            except queue.Empty:
                continue
            pending -= 1
            if err is not None:
                errors.append(err)
                stop.set()  # nothing new starts; in-flight calls still land
                continue
            if not ran:
                continue
            if first_only:
                bar.update(1)
                feed()
                continue
            v = ledger_verdict(it, teacher, ledger, qc)
            out[it["path"]] = v
            if on_done is not None:
                on_done(it, v)
            counts["accepted"] += v[0] == "accepted"
            counts["failed"] += v[0] == "failed"
            rate = (budget.calls - calls0) / max(time.monotonic() - t0, 1e-9)
            bar.set_postfix(accepted=counts["accepted"], failed=counts["failed"], usd=f"{budget.spent:.4f}",
                            calls_s=f"{rate:.1f}", refresh=False)
            bar.update(1)
            feed()
    except BaseException:  # Ctrl-C / SIGTERM in the main thread, or on_done failed
        stop.set()
        _drain(pool, pending, grace_s)
        raise
    finally:
        pool.close()
        bar.close()
    if errors:
        raise errors[0]
    if budget.stopped:
        log.warning("budget stop: spend $%.4f of --max_usd $%.2f; no new calls started. Rerun with a higher "
                    "--max_usd to resume where this stopped.", budget.spent, budget.max_usd)
    return out


def _drain(pool, pending, grace_s):
    """Wait up to grace_s for the calls in flight to land in the ledger; a second Ctrl-C stops waiting."""
    deadline = time.monotonic() + grace_s
    try:
        while pending and time.monotonic() < deadline:
            try:
                pool.get(timeout=min(0.2, max(deadline - time.monotonic(), 0.01)))
                pending -= 1
            except queue.Empty:
                pass
    except KeyboardInterrupt:
        pass
    if pending:
        log.warning("%d teacher call(s) still in flight after %.0fs were abandoned; a rerun asks them again",
                    pending, grace_s)


# ----------------------------------------------------------------------------- the sample the label step asks

def label_sample(manifest, seed, max_label, classes, gold_csv=None, gold_n=0, first=()):
    """-> (sample paths with gold first, {gold path: gold label}). Ground truth picks nothing here
    except the gold_n stand-in labels, which play a person checking those items. first: sha256s that come
    first, in the same seeded order (--label_map: images answered before, which moved to a merged class's folder)."""
    train = sorted(p for p, r in manifest.items() if r["split"] == "train")
    order = train[:]
    random.Random(seed).shuffle(order)  # a fixed order, so a larger --max_label extends the sample
    first = set(first)
    order.sort(key=lambda p: manifest[p]["sha256"] not in first)  # stable: the seeded order within each part
    gold = {}
    if gold_csv:
        for i, r in enumerate(read_csv(gold_csv)):
            p, lab = (r.get("path") or "").strip(), (r.get("label") or "").strip()
            if p not in manifest or manifest[p]["split"] != "train":
                raise GoldError(f"--gold_csv row {i + 2}: path {p!r} is not a training image in the run's "
                                f"manifest.csv (use paths like images/train/<class>/<file>.jpg)")
            if lab not in classes:
                raise GoldError(f"--gold_csv row {i + 2}: label {lab!r} is not one of {classes}")
            gold[p] = lab
    elif gold_n:
        gold = {p: manifest[p]["label"] for p in order[:gold_n]}
    if len(gold) > max_label:
        raise GoldError(f"{len(gold)} gold items exceed --max_label {max_label}; gold items count within the sample")
    rest = [p for p in order if p not in gold][:max(0, max_label - len(gold))]
    return list(gold) + rest, gold


def shard_of(sample, gold, manifest, i, n):
    """The part of the sample (and of its gold) that shard i of n labels: a stable hash of each image's
    sha256 picks its part, so parts are disjoint, cover the sample, and do not depend on the machine.

    >>> m = {f"p{k}": {"sha256": f"{k:064x}"} for k in range(100)}
    >>> parts = [shard_of(list(m), {"p1": "x"}, m, i, 3) for i in range(3)]
    >>> sorted(sum((p for p, _ in parts), [])) == sorted(m), sum(len(g) for _, g in parts)
    (True, 1)
    """
    mine = [p for p in sample if int(stable_unit("shard", manifest[p]["sha256"]) * n) == i]
    keep = set(mine)
    return mine, {p: lab for p, lab in gold.items() if p in keep}


# ----------------------------------------------------------------------------- the label step

def label_all(cfg, P, items, gold, teacher, ledger, qc, budget, outputs):
    """Gold first (the gate, and the QC rule fitted on it), then the rest. outputs(gold_report, rule, **state)
    rewrites the label files from the ledger on every way out, so they match what was paid."""
    state = {"gold_report": None, "rule": fit_rule([], cfg["target_label_precision"])}
    write_flags(P.label_flags, None, None)  # refilled below when the held-out model's flags are fitted; no stale ones
    try:
        rest = [it for it in items if it["path"] not in gold]
        if gold:
            gitems = [it for it in items if it["path"] in gold]
            verdicts = label_items(gitems, teacher, ledger, qc, budget, "gold", cfg["max_workers"], "label gold")
            g = state["gold_report"] = gold_check(gold, {p: v.label for p, v in verdicts.items()}, cfg["classes"])
            state["rule"] = fit_rule(gold_pins(gitems, gold, teacher, ledger, qc), cfg["target_label_precision"])
            log.info("gold check: teacher accuracy %.3f on %d gold items (--min_gold_acc %.2f)", g["accuracy"], g["n"],
                     cfg["min_gold_acc"])
            if g["accuracy"] < cfg["min_gold_acc"]:
                outputs(**state)
                raise GoldGateError(f"teacher accuracy on gold items is {g['accuracy']:.3f} < --min_gold_acc "
                                    f"{cfg['min_gold_acc']}; stopping before labeling the rest. Confusions (true -> "
                                    f"teacher: n): " + ", ".join(f"{k}: {v}" for k, v in g["confusions"].items())
                                    + ". Check the prompt, the model and the class names.")
            if qc.second_pass == "fitted":
                state["rule"] = fit_qc_rule(cfg, P, items, rest, gitems, gold, teacher, ledger, qc, budget)
        if qc.second_pass == "model":  # with or without gold (then the stated priors)
            state["rule"] = fit_label_rule(cfg, P, items, rest, gold, teacher, ledger, qc, budget)
        label_items(rest, teacher, ledger, qc, budget, "label", cfg["max_workers"], "label")
        return outputs(**state, budget_stopped=budget.stopped)  # before the ledger closes: the outputs read it
    except FatalTeacherError:
        outputs(**state, budget_stopped=budget.stopped)
        raise
    except KeyboardInterrupt:
        outputs(**state, budget_stopped=budget.stopped, interrupted=True)  # the files match what was paid
        raise


def fit_qc_rule(cfg, P, items, rest, gitems, gold, teacher, ledger, qc, budget):
    """The fitted rule: with --confident_learning on, every first answer is asked first, so the held-out
    model can judge each label before any second call; then threshold and flag cut are fitted on gold
    and set on qc (flagged labels listed in label_flags.csv). -> QCRule."""
    judged = None
    if cfg["confident_learning"] == "on":
        label_items(rest, teacher, ledger, qc, budget, "label", cfg["max_workers"], "label (first answers)",
                    first_only=True)
        judged = held_out_scores(cfg["classes"], cfg["seed"], items, teacher, ledger, qc, gold)
    scores = judged.scores if judged else None
    rule = fit_rule(gold_pins(gitems, gold, teacher, ledger, qc, scores), cfg["target_label_precision"],
                    flag_cuts(scores))
    if judged and rule.student is not None:
        rule.student.update(representation=judged.representation, auroc_by_representation=judged.auroc)
    qc.threshold = rule.threshold
    # gold pins are judged by both answers (and a person's label), so they are never listed as flagged
    qc.flagged = write_flags(P.label_flags, {sha: h for sha, h in (scores or {}).items() if sha not in qc.always_second},
                             rule.flag_below)
    log.info("QC rule: %s", rule.why)
    return rule


def fit_label_rule(cfg, P, items, rest, gold, teacher, ledger, qc, budget):
    """The label model: every first answer is asked first, the held-out model (--confident_learning on)
    judges each, then the model is fitted on the gold pins (stated priors without them) and set on qc, so
    the rest of the step asks a second answer only where it can change the decision. -> LabelModel."""
    label_items(rest, teacher, ledger, qc, budget, "label", cfg["max_workers"], "label (first answers)",
                first_only=True)
    judged = None
    if cfg["confident_learning"] == "on":  # without gold, the first available of quality.NO_GOLD_ORDER
        judged = held_out_scores(cfg["classes"], cfg["seed"], items, teacher, ledger, qc, gold)
    qc.held_out = {sha: h.p_label for sha, h in judged.scores.items()} if judged else {}
    pins, everyone = [], []
    for it in items:
        p1 = ledger.ok(qc.call(it["sha256"], 1, teacher.model).key)
        if p1 is None:
            continue
        everyone.append(evidence_of(p1, qc.held_out.get(it["sha256"])))
        if it["path"] in gold:
            p2 = ledger.ok(qc.call(it["sha256"], 2, teacher.model).key)
            pins.append((evidence_of(p1, qc.held_out.get(it["sha256"]), p2), p1["label"] == gold[it["path"]]))
    lm = fit_label_model(pins, everyone, cfg["classes"], cfg["target_label_precision"], cfg["min_yield"])
    if judged:
        lm.report["held_out"] = {"representation": judged.representation, "auroc_by_representation": judged.auroc}
    qc.label_model = lm
    write_json(P.label_model, lm.to_json())
    log.info("QC rule: %s", lm.why)
    return lm

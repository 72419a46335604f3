"""Production monitoring for `--step serve`: Prometheus metrics (/metrics) and drift against validation (/health).

Drift compares a window of recent uploads (the last DRIFT_WINDOW the student looked at) with the served
student's validation split, on three figures:
- the predicted-class mix, by population stability index (PSI);
- the calibrated confidence distribution, binned, by PSI;
- the out-of-distribution rate (flywheel.ood), against what the OOD threshold lets through on validation.
PSI = sum over bins of (p - q) * ln(p / q), each share smoothed by half an observation, so an empty bin
counts. The usual reading: under 0.1 stable, 0.1-0.25 a shift worth a look, above 0.25 a shift. A figure
alarms when it is past its limit AND the difference is significant for the sample sizes (p < ALPHA), so a
small validation split does not alarm on noise: PSI is Jeffreys' divergence, and n*m/(n+m) * PSI is about
chi-square with bins-1 degrees of freedom when nothing changed; the OOD rate is tested as a binomial against
what validation lets through, at least 1/(n_val + 1) (a new image beats the largest of n validation
distances that often, whatever quantile was asked for). No alarm before MIN_DRIFT_N uploads.

Metrics live in the Service's own registry (not prometheus-client's global one), so two services in one
process (tests) never collide.
"""
import threading
from collections import deque
from typing import NamedTuple

import numpy as np

DRIFT_WINDOW = 500       # uploads: the recent production compared with validation
MIN_DRIFT_N = 50         # uploads before the alarm may sound: fewer say too little
PSI_ALARM = 0.25         # the conventional "significant shift"
OOD_ALARM_FACTOR, OOD_ALARM_FLOOR = 3.0, 0.05  # OOD rate alarm: above 3x validation's and 5 points over it
ALPHA = 0.001            # significance a figure's difference needs before it alarms
CONF_BINS = np.array([0.0, 0.5, 0.7, 0.85, 0.95, 1.0 + 1e-9])  # confidence bins (edges), finer where tau lives
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds


def psi(p_counts, q_counts) -> float:
    """Population stability index of observed counts p against reference counts q (same bins), each share
    smoothed by half an observation.

    >>> round(psi([50, 50], [50, 50]), 6)
    0.0
    >>> round(psi([90, 10], [50, 50]), 3)   # (0.896-0.5)ln(0.896/0.5) + (0.104-0.5)ln(0.104/0.5) = 0.853
    0.853
    """
    p, q = np.asarray(p_counts, float) + 0.5, np.asarray(q_counts, float) + 0.5
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum((p - q) * np.log(p / q)))


def conf_counts(conf) -> np.ndarray:
    """Confidences -> counts per CONF_BINS bin.

    >>> conf_counts([0.3, 0.6, 0.99, 1.0]).tolist()
    [1, 1, 0, 0, 2]
    """
    return np.histogram(np.asarray(conf, float), bins=CONF_BINS)[0]


class Reference(NamedTuple):
    """What validation looked like to the served student."""
    class_counts: list   # predicted class -> count, in class order
    conf_counts: list    # per CONF_BINS bin
    ood_rate: float      # share of validation the OOD check would send to a person (1 - its quantile)
    n: int


def reference_of(val_probs, ood_rate) -> Reference:
    """val_probs [N, C] calibrated -> the reference drift compares production with; ood_rate: what the OOD
    threshold lets through on validation, raised to 1/(N+1) (see the module docstring)."""
    vp = np.asarray(val_probs, float)
    return Reference(np.bincount(vp.argmax(1), minlength=vp.shape[1]).tolist(), conf_counts(vp.max(1)).tolist(),
                     max(float(ood_rate), 1.0 / (len(vp) + 1)), len(vp))


def psi_p_value(psi_value, n, m, bins) -> float:
    """P(PSI at least this large | no change) for samples of n and m over `bins` bins (chi-square approximation).

    >>> round(psi_p_value(0.3, 1000, 1000, 5), 6)   # 500 * 0.3 = 150 on 4 degrees of freedom
    0.0
    >>> round(psi_p_value(0.3, 9, 60, 5), 2)        # the same PSI from 9 validation images means little
    0.67
    """
    from scipy.stats import chi2
    return float(chi2.sf(psi_value * n * m / (n + m), max(1, bins - 1)))


def drift(ref: Reference, pred, conf, unlike) -> dict:
    """The window (predicted class indices, confidences, OOD flags) against the reference.

    >>> ref = Reference([50, 50], [0, 0, 10, 40, 50], 0.005, 100)
    >>> d = drift(ref, [0] * 60, [0.99] * 60, [False] * 60)
    >>> d["alarm"], d["why"]
    (True, ['predicted-class mix PSI 2.36 > 0.25 (p 5e-21)', 'confidence PSI 2.07 > 0.25 (p 5e-16)'])
    >>> drift(ref, [0, 1] * 30, [0.8] * 6 + [0.9] * 24 + [0.99] * 30, [False] * 60)["alarm"]  # validation's shape
    False
    """
    n = len(pred)
    out = {"window": n, "min_window": MIN_DRIFT_N, "reference_n": ref.n}
    if n == 0:
        return {**out, "alarm": False, "why": [], "class_psi": None, "confidence_psi": None, "ood_rate": None,
                "reference_ood_rate": ref.ood_rate}
    from scipy.stats import binom
    k = len(ref.class_counts)
    figures = {"class_psi": psi(np.bincount(np.asarray(pred, int), minlength=k), ref.class_counts),
               "confidence_psi": psi(conf_counts(conf), ref.conf_counts)}
    why = [f"{name} PSI {v:.2f} > {PSI_ALARM} (p {p:.1g})" for name, v, bins in
           (("predicted-class mix", figures["class_psi"], k), ("confidence", figures["confidence_psi"], len(CONF_BINS) - 1))
           if v > PSI_ALARM and (p := psi_p_value(v, ref.n, n, bins)) < ALPHA]
    n_ood = int(np.sum(unlike))
    ood, ood_limit = n_ood / n, max(OOD_ALARM_FACTOR * ref.ood_rate, ref.ood_rate + OOD_ALARM_FLOOR)
    if ood > ood_limit and (p := float(binom.sf(n_ood - 1, n, ref.ood_rate))) < ALPHA:
        why.append(f"out-of-distribution rate {ood:.3f} > {ood_limit:.3f} (p {p:.1g})")
    return {**out, **{k_: round(v, 4) for k_, v in figures.items()}, "ood_rate": round(ood, 4),
            "reference_ood_rate": ref.ood_rate, "alarm": n >= MIN_DRIFT_N and bool(why), "why": why}


SIZE_EDGES = (32, 96, 224)  # px, the shorter side: production slices by image size


def size_slice(width, height) -> str:
    """An upload's size slice, by its shorter side.

    >>> size_slice(28, 40), size_slice(32, 500), size_slice(224, 224)
    ('<32px', '32-95px', '224px+')
    """
    side = min(width, height)
    lo = 0
    for edge in SIZE_EDGES:
        if side < edge:
            return f"<{edge}px" if lo == 0 else f"{lo}-{edge - 1}px"
        lo = edge
    return f"{SIZE_EDGES[-1]}px+"


def escalation_table(snapshots, dim) -> list:
    """Summed production counts along one dimension -> [(value, requests, escalated share)], by value.

    >>> snaps = [{"counts": [["class", "pear", "student", 3], ["class", "pear", "llm", 1], ["hour", "h1", "llm", 1]]}]
    >>> escalation_table(snaps, "class")
    [('pear', 4, 0.25)]
    """
    n, esc = {}, {}
    for snap in snapshots:
        for d, value, route, k in snap["counts"]:
            if d == dim:
                n[value] = n.get(value, 0) + k
                esc[value] = esc.get(value, 0) + (k if route != "student" else 0)
    return [(v, n[v], round(esc[v] / n[v], 4)) for v in sorted(n)]


class Monitor:
    """Counters, histograms and the drift window of one serving process. Thread-safe."""

    def __init__(self, classes, reference: Reference, turn: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = r = CollectorRegistry()
        self.requests = Counter("cifar_distill_requests", "requests answered, by route", ["route"], registry=r)
        self.latency = Histogram("cifar_distill_latency_seconds", "server-side latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.confidence = Histogram("cifar_distill_student_confidence", "the student's calibrated top probability",
                                    buckets=tuple(CONF_BINS[1:-1]) + (1.0,), registry=r)
        self.llm_calls = Gauge("cifar_distill_llm_calls", "paid LLM calls this server made since it started", registry=r)
        self.llm_usd = Gauge("cifar_distill_llm_usd", "what this server's LLM calls cost since it started, USD", registry=r)
        self.ood = Counter("cifar_distill_ood", "uploads the OOD check sent to a person", registry=r)
        self.turn = Gauge("cifar_distill_turn", "the flywheel turn whose student is served", registry=r)
        self.drift_alarm = Gauge("cifar_distill_drift_alarm", "1 while recent traffic drifted from validation", registry=r)
        self.drift_psi = Gauge("cifar_distill_drift_psi", "PSI of recent traffic against validation", ["figure"], registry=r)
        self.drift_ood = Gauge("cifar_distill_drift_ood_rate", "OOD rate of the recent window", registry=r)
        self._lock = threading.Lock()
        self.counts = {}  # (dimension, value, route) -> requests: the report's production section
        self.swap(classes, reference, turn)

    def swap(self, classes, reference, turn):
        """A new student: its own reference, and a fresh window (the old one was judged by another model)."""
        with self._lock:
            self.classes, self.reference = list(classes), reference
            self._window = deque(maxlen=DRIFT_WINDOW)
        self.turn.set(turn)

    def observe_student(self, probs, label, unlike: bool):
        self.confidence.observe(float(np.max(probs)))
        if unlike:
            self.ood.inc()
        with self._lock:
            if label in self.classes:
                self._window.append((self.classes.index(label), float(np.max(probs)), bool(unlike)))

    def watch_budget(self, budget):
        """LLM calls and spend, read from the run's budget (flywheel.labeling.Budget) at each scrape."""
        self.llm_calls.set_function(lambda: budget.calls)
        self.llm_usd.set_function(lambda: budget.run_spent)

    def observe_request(self, route, seconds, label=None, size=None, source=None):
        """One answered request: its route and latency, and the slices the report breaks escalation down by (the
        hour, UTC; the answered class; the image size; the client's `source` field)."""
        import time
        self.requests.labels(route).inc()
        self.latency.labels(route).observe(seconds)
        keys = [("hour", time.strftime("%Y-%m-%dT%H:00Z", time.gmtime()))]
        keys += [("class", label)] if label else []
        keys += [("size", size_slice(*size))] if size else []
        keys += [("source", source or "unnamed")]
        with self._lock:
            for dim, value in keys:
                self.counts[(dim, value, route)] = self.counts.get((dim, value, route), 0) + 1

    def snapshot(self) -> list:
        """[[dimension, value, route, requests]], cumulative since this server started."""
        with self._lock:
            return [[*k, n] for k, n in sorted(self.counts.items())]

    def drift(self) -> dict:
        with self._lock:
            w = list(self._window)
            ref = self.reference
        d = drift(ref, [x[0] for x in w], [x[1] for x in w], [x[2] for x in w])
        self.drift_alarm.set(1 if d["alarm"] else 0)
        for k in ("class_psi", "confidence_psi"):
            if d[k] is not None:
                self.drift_psi.labels(k.replace("_psi", "")).set(d[k])
        if d["ood_rate"] is not None:
            self.drift_ood.set(d["ood_rate"])
        return d

    def exposition(self) -> bytes:
        """The Prometheus text format, drift figures refreshed first."""
        from prometheus_client import generate_latest
        self.drift()
        return generate_latest(self.registry)

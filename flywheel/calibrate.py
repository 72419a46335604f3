"""Calibration and metrics as small pure numpy functions, each with a worked example.

Shapes: logits [N, C] float, labels/preds [N] int, conf [N] float in [0, 1], correct [N] bool.
Shortcut taken: temperature is fitted by golden-section search on log(1/T) (the NLL is convex in 1/T,
so it is unimodal there) instead of LBFGS; 100 iterations reach ~1e-20 relative width.
"""
import math

import numpy as np


def softmax(logits, T=1.0):
    """Row-wise softmax of logits / T.

    >>> softmax(np.array([[0.0, 0.0], [math.log(3), 0.0]])).round(2).tolist()
    [[0.5, 0.5], [0.75, 0.25]]
    """
    z = np.asarray(logits, np.float64) / T
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits, labels, T=1.0) -> float:
    """Mean negative log-likelihood of labels under softmax(logits / T).

    >>> round(nll(np.array([[math.log(3), 0.0]]), np.array([0])), 4)  # -log(0.75)
    0.2877
    """
    z = np.asarray(logits, np.float64) / T
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(labels)), np.asarray(labels)].mean())


def fit_temperature(logits, labels, lo=0.05, hi=20.0, iters=100) -> float:
    """The scalar T > 0 minimising nll(logits, labels, T), searched over T in [lo, hi].

    Logits that are 3x too confident get T close to 3 back (see tests/test_calibrate.py).
    >>> fit_temperature(np.array([[2.0, 0.0], [2.0, 0.0]]), np.array([0, 1]))  # 50% right: flatten fully
    20.0
    """
    a, b = math.log(1.0 / hi), math.log(1.0 / lo)   # search over log(beta), beta = 1/T
    g = (math.sqrt(5) - 1) / 2
    f = lambda lb: nll(logits, labels, 1.0 / math.exp(lb))  # noqa: E731
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    T = 1.0 / math.exp((a + b) / 2)
    return float(round(T, 6))


def ece(conf, correct, n_bins=15) -> float:
    """Expected calibration error with equal-width bins (lo, hi]: sum_b |B|/N * |acc_b - conf_b|.

    >>> ece(np.array([0.9, 0.9, 0.6, 0.6]), np.array([1, 0, 1, 1]), n_bins=10)  # (2*|0.5-0.9| + 2*|1-0.6|)/4
    0.4
    """
    conf, correct = np.asarray(conf, np.float64), np.asarray(correct, np.float64)
    if len(conf) == 0:
        return 0.0
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            total += m.sum() / len(conf) * abs(correct[m].mean() - conf[m].mean())
    return float(round(total, 12))


def reliability_bins(conf, correct, n_bins=15):
    """[{lo, hi, count, conf, acc}] per non-empty bin, for reliability diagrams."""
    conf, correct = np.asarray(conf, np.float64), np.asarray(correct, np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    out = []
    for b in range(n_bins):
        m = bins == b
        if m.any():
            out.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "count": int(m.sum()),
                        "conf": float(conf[m].mean()), "acc": float(correct[m].mean())})
    return out


def threshold_for_precision(conf, correct, target) -> float:
    """Lowest threshold tau whose accepted set {conf >= tau} has precision >= target.

    Returns 1.0 + 1e-9 (accept nothing) when no threshold reaches the target.
    >>> threshold_for_precision(np.array([0.95, 0.9, 0.8, 0.7, 0.6]), np.array([1, 1, 1, 0, 0]), 0.75)
    0.7
    >>> threshold_for_precision(np.array([0.95, 0.9, 0.8, 0.7, 0.6]), np.array([1, 1, 1, 0, 0]), 1.0)
    0.8
    """
    conf, correct = np.asarray(conf, np.float64), np.asarray(correct, np.float64)
    order = np.argsort(-conf, kind="stable")
    c, k = conf[order], correct[order]
    prec = np.cumsum(k) / np.arange(1, len(k) + 1)
    # only cut between distinct confidence values: tau = c[i] accepts every item with conf >= c[i]
    last_of_tie = np.r_[c[1:] != c[:-1], True]
    ok = np.flatnonzero(last_of_tie & (prec >= target - 1e-12))
    return float(c[ok[-1]]) if len(ok) else 1.0 + 1e-9


def threshold_for_budget(conf, max_escalation) -> float:
    """Lowest tau such that the escalated fraction {conf < tau} is at most max_escalation.

    >>> threshold_for_budget(np.array([0.9, 0.8, 0.7, 0.6]), 0.5)  # escalate 0.6 and 0.7
    0.8
    >>> threshold_for_budget(np.array([0.9, 0.8, 0.7, 0.6]), 0.0)
    0.6
    """
    c = np.sort(np.asarray(conf, np.float64))
    n = len(c)
    k = int(math.floor(max_escalation * n + 1e-9))  # items we may escalate
    if k >= n:
        return 1.0 + 1e-9
    return float(c[k])


def coverage_precision(conf, correct, tau):
    """(coverage, precision) of auto-accepting {conf >= tau}; precision is None when nothing is accepted.

    >>> coverage_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 1, 0, 1]), 0.7)
    (0.75, 0.6666666666666666)
    """
    conf, correct = np.asarray(conf, np.float64), np.asarray(correct, np.float64)
    m = conf >= tau
    cov = float(m.mean()) if len(conf) else 0.0
    return cov, (float(correct[m].mean()) if m.any() else None)


def confusion_matrix(y_true, y_pred, n_classes):
    """Rows are true labels, columns predictions.

    >>> confusion_matrix([0, 0, 1, 1], [0, 1, 1, 1], 2).tolist()
    [[1, 1], [0, 2]]
    """
    cm = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def classification_metrics(y_true, y_pred, classes):
    """Accuracy, macro-F1 and a per-class report from the confusion matrix.

    >>> m = classification_metrics([0, 0, 1, 1], [0, 1, 1, 1], ["a", "b"])
    >>> m["accuracy"], round(m["macro_f1"], 4), round(m["report"]["b"]["f1"], 4)  # a: P=1 R=.5; b: P=2/3 R=1
    (0.75, 0.7333, 0.8)
    """
    cm = confusion_matrix(y_true, y_pred, len(classes))
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1), cm.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(predicted > 0, tp / predicted, 0.0)
        r = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    report = {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f1[i]), "support": int(support[i])}
              for i, c in enumerate(classes)}
    n = int(cm.sum())
    return {"accuracy": float(tp.sum() / n) if n else 0.0, "macro_f1": float(f1.mean()),
            "confusion_matrix": cm.tolist(), "report": report}


def margin(probs):
    """Top-1 minus top-2 probability per row: small margin = the student is torn between two classes.

    >>> margin(np.array([[0.6, 0.3, 0.1]])).round(2).tolist()
    [0.3]
    """
    s = np.sort(np.asarray(probs), axis=1)
    return s[:, -1] - s[:, -2]

"""The label model: P(the teacher's first answer is right | every signal there is), fitted on gold pins,
and the decisions it drives (accept, ask one more answer, send to a person). Pure functions and records.

Signals, each one feature in logit units (clipped to +-LOGIT_CAP, so one extreme value cannot dominate):
  confidence  logit of the stated confidence
  logprob     logit of the probability of the label's first token, where the endpoint returned logprobs
  held_out    logit of the held-out model's probability of the label minus logit(1/K) (0 = chance)
  agree       +1 when a second answer (same model in another order, or --second_model) named the same label,
              -1 another label (only in the model that has seen a second answer)
  class       an offset per first-answer class (teachers err unevenly)
logit P(right) = bias + sum_s w_s x_s + u_class.

Fit: a logistic regression by maximum a posteriori (Newton's method) with a Gaussian prior on each weight,
centred on the stated priors (PRIOR_MEAN) with precision PRIOR_PRECISION. With no gold the model *is* the
priors (and the run says so); with 30-100 pins each weight moves only as far as the pins support it, and
the class offsets, with few pins each, move least. A signal missing on an image counts as its gold mean.

Two models are fitted on the same pins: `first` (no agreement; judges an image with one answer) and
`pair` (with it; judges an image after a second answer). The decision for an image with score p1 = first's
probability and p+ = pair's probability were a second answer to agree, at threshold t:
  p1 >= t            accept the first answer (one paid call);
  p1 < t <= p+       ask one more answer: only there can it change the decision; accept if pair's
                     probability with the real answer reaches t;
  otherwise          a person decides (no second call: whatever it said, the label would not be accepted).
t is the lowest threshold whose accepted gold labels reach --target_label_precision at the lower 95% bound
with an estimated yield of at least --min_yield; when none does, the highest threshold that keeps the
estimated yield >= --min_yield (the best accepted accuracy at that yield), and label_summary.json says so.
Never "ask every image twice".
"""
import math
from dataclasses import asdict, dataclass, field

import numpy as np

SIGNALS = ("confidence", "logprob", "held_out", "agree")
LOGIT_CAP = 4.6  # |logit| <= 4.6 is p in [0.01, 0.99]: beyond that, stated numbers are not evidence
# stated priors (logit-unit weights): confidence and logprob are read at a little under face value, the
# held-out model as weak evidence, agreement as moderate evidence; no class is assumed worse than another
PRIOR_MEAN = {"bias": 0.0, "confidence": 0.7, "logprob": 0.7, "held_out": 0.3, "agree": 1.0}
# precision of each weight's prior (1 / variance): the bias is nearly free, signals move with ~30 pins,
# class offsets (few pins each) are shrunk hardest toward 0
PRIOR_PRECISION = {"bias": 0.01, "confidence": 1.0, "logprob": 1.0, "held_out": 1.0, "agree": 1.0, "class": 4.0}
# accepting a label pays when it is right more than VALUE_P of the time: below, the wrong labels it lets in (which
# the student learns as confidently as right ones) outweigh the yield. The target and --min_yield bound t around it.
VALUE_P = 0.75
PRIOR_THRESHOLD = 0.7  # t before any label step fitted one (a cascade on a run without label_model.json)
PRIOR_ASK_ABOVE = 0.6  # and the narrow band below it where a second answer is asked
CV_FOLDS = 5


def logit(p):
    """logit(p), clipped to +-LOGIT_CAP.

    >>> logit(0.5), round(logit(0.9), 4), logit(1.0)
    (0.0, 2.1972, 4.6)
    """
    p = min(max(float(p), 1e-12), 1 - 1e-12)
    return float(np.clip(math.log(p / (1 - p)), -LOGIT_CAP, LOGIT_CAP))


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


@dataclass
class Evidence:
    """One image's signals about its first answer."""
    label: str                # the first answer's label
    confidence: float         # its stated confidence
    logprob: float = None     # natural log-probability of the label's first token, or None
    held_out: float = None    # the held-out model's probability of this label, or None
    agree: bool = None        # a second answer named the same label (None: no second answer)


def evidence_of(rec, held_out=None, second=None):
    """Evidence from a first answer's ledger record (and a second answer's, and a held-out score)."""
    return Evidence(rec["label"], float(rec["confidence"]), rec.get("label_logprob"), held_out,
                    None if second is None else second["label"] == rec["label"])


def fit_map(x, y, mean, precision, iters=50):
    """Maximum a posteriori logistic regression: maximise sum(y log p + (1-y) log(1-p)) - 0.5 sum(prec (b -
    mean)^2) over weights b, p = sigmoid(x b), by Newton's method. x [n, d], y [n] in {0, 1}.

    Intercept only, 8 of 10 right, no prior: the fit is the rate; with prior mean 0 and precision lam the
    optimum solves 8 - 10 sigmoid(b) - lam b = 0, which b = logit(0.75) satisfies at lam = 0.5 / logit(0.75):
    >>> x, y = np.ones((10, 1)), np.array([1] * 8 + [0] * 2)
    >>> round(float(sigmoid(fit_map(x, y, np.zeros(1), np.zeros(1))[0])), 4)
    0.8
    >>> round(float(sigmoid(fit_map(x, y, np.zeros(1), np.array([0.5 / math.log(3)]))[0])), 4)
    0.75
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mean, precision = np.asarray(mean, np.float64), np.asarray(precision, np.float64)
    b = mean.copy()
    for _ in range(iters):
        p = sigmoid(x @ b)
        grad = x.T @ (y - p) - precision * (b - mean)
        hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(precision) + 1e-9 * np.eye(len(b))
        step = np.linalg.solve(hess, grad)
        step *= min(1.0, 5.0 / max(np.abs(step).max(), 1e-12))  # separable pins without a prior: no blow-up
        b += step
        if np.abs(step).max() < 1e-10:
            break
    return b


@dataclass
class Model:
    """One fitted logistic model over named features (see the module docstring)."""
    classes: list
    signals: list          # the signals it reads, in feature order
    weights: dict          # {"bias", signal, "class:<name>": weight in logit units}
    fill: dict             # {signal: the value a missing signal counts as}

    def features(self, e: Evidence):
        x = [1.0]
        for s in self.signals:
            v = raw_feature(s, e, len(self.classes))
            x.append(self.fill.get(s, 0.0) if v is None else v)
        x += [1.0 if e.label == c else 0.0 for c in self.classes]
        return np.array(x)

    def names(self):
        return ["bias", *self.signals, *(f"class:{c}" for c in self.classes)]

    def p_right(self, e: Evidence) -> float:
        w = np.array([self.weights.get(n, 0.0) for n in self.names()])
        return float(sigmoid(self.features(e) @ w))


def raw_feature(signal, e: Evidence, k):
    """One signal's feature value in logit units, or None when the image does not have it.

    >>> e = Evidence("a", 0.9, logprob=math.log(0.5), held_out=0.25, agree=False)
    >>> [round(raw_feature(s, e, 4), 4) for s in SIGNALS]
    [2.1972, 0.0, 0.0, -1.0]
    """
    if signal == "confidence":
        return logit(e.confidence)
    if signal == "logprob":
        return None if e.logprob is None else logit(math.exp(min(float(e.logprob), 0.0)))
    if signal == "held_out":
        return None if e.held_out is None else logit(e.held_out) - logit(1.0 / k)
    if signal == "agree":
        return None if e.agree is None else (1.0 if e.agree else -1.0)
    raise ValueError(signal)


def fit_model(evidence, right, classes, signals):
    """A Model fitted on gold pins (evidence [Evidence], right [bool]); with no pins, the stated priors.

    Two classes, confidence only, flat priors swamped by 40 pins: confident answers are right, others not.
    >>> ev = [Evidence("a", 0.95)] * 20 + [Evidence("b", 0.6)] * 20
    >>> m = fit_model(ev, [True] * 18 + [False] * 2 + [True] * 10 + [False] * 10, ["a", "b"], ["confidence"])
    >>> round(m.p_right(Evidence("a", 0.95)), 2) > 0.85 > 0.55 > round(m.p_right(Evidence("b", 0.6)), 2)
    True
    """
    k = len(classes)
    fill = {}
    for s in signals:
        vals = [v for e in evidence if (v := raw_feature(s, e, k)) is not None]
        fill[s] = float(np.mean(vals)) if vals else 0.0
    m = Model(list(classes), list(signals), {}, fill)
    names = m.names()
    mean = np.array([PRIOR_MEAN.get(n, 0.0) for n in names])
    prec = np.array([PRIOR_PRECISION["class" if n.startswith("class:") else n] for n in names])
    if evidence:
        b = fit_map(np.stack([m.features(e) for e in evidence]), np.array(right, float), mean, prec)
    else:
        b = mean
    m.weights = {n: round(float(w), 6) for n, w in zip(names, b)}
    return m


def signals_present(evidence):
    """The signals (besides agreement) that at least one image has; confidence always."""
    out = ["confidence"]
    if any(e.logprob is not None for e in evidence):
        out.append("logprob")
    if any(e.held_out is not None for e in evidence):
        out.append("held_out")
    return out


@dataclass
class LabelModel:
    """The fitted pair of models, the threshold in force and how both were chosen (label_model.json)."""
    first: Model
    pair: Model
    threshold: float
    mode: str              # target | min_yield | prior
    why: str
    n_gold: int
    ask_above: float = 0.0  # a second answer only for p1 >= this (the second-call budget, MAX_ASK_SHARE)
    report: dict = field(default_factory=dict)   # per-signal AUROC, cross-validated calibration, estimate

    @property
    def estimate(self):
        """Accepted-label accuracy on the gold pins under the rule in force, with its 95% interval and yield."""
        return self.report.get("estimate_on_gold")

    def p1(self, e: Evidence) -> float:
        return self.first.p_right(Evidence(e.label, e.confidence, e.logprob, e.held_out))

    def p_if_agree(self, e: Evidence) -> float:
        return self.pair.p_right(Evidence(e.label, e.confidence, e.logprob, e.held_out, True))

    def p_final(self, e: Evidence) -> float:
        """The probability the accepted label is right, from what the image has (one answer or two)."""
        return self.p1(e) if e.agree is None else self.pair.p_right(e)

    def second_helps(self, e: Evidence) -> bool:
        """A second answer can change the decision: below t now, at or above t if it agrees."""
        return decision(self.p1(e), self.p_if_agree(e), self.threshold, self.ask_above) == "ask"

    def to_json(self):
        return asdict(self)

    @classmethod
    def from_json(cls, d):
        return cls(Model(**d["first"]), Model(**d["pair"]), float(d["threshold"]), d["mode"], d["why"],
                   int(d["n_gold"]), float(d.get("ask_above") or 0.0), d.get("report") or {})


def prior_model(classes, signals=("confidence", "logprob", "held_out")):
    """The stated priors, before any gold: used until a label step fits one."""
    return LabelModel(fit_model([], [], classes, list(signals)), fit_model([], [], classes, [*signals, "agree"]),
                      PRIOR_THRESHOLD, "prior", f"stated priors, no gold pins; accept at >= {PRIOR_THRESHOLD}, a second "
                      f"answer from {PRIOR_ASK_ABOVE} where an agreeing one would lift it over", 0, PRIOR_ASK_ABOVE)


def decision(p1, p_plus, t, ask_above=0.0):
    """accept | ask (one more answer can change the decision, and the image is within the second-call
    budget: p1 >= ask_above) | review.

    >>> decision(0.9, 0.95, 0.8), decision(0.6, 0.85, 0.8), decision(0.5, 0.7, 0.8), decision(0.6, 0.85, 0.8, 0.7)
    ('accept', 'ask', 'review', 'review')
    """
    if p1 >= t:
        return "accept"
    return "ask" if p_plus >= t and p1 >= ask_above else "review"


def ask_floor(p1, p_plus, t, share):
    """The lowest p1 that may get a second answer at threshold t, so that at most `share` of the images do:
    the band's images (p1 < t <= p_plus) closest to t go first (an agreeing answer most likely lifts them).

    >>> ask_floor([0.9, 0.7, 0.6, 0.5], [0.95, 0.9, 0.85, 0.82], 0.8, 0.5)   # two of four: 0.7 and 0.6
    0.6
    >>> ask_floor([0.9, 0.7], [0.95, 0.75], 0.8, 0.5)   # nothing a second answer could lift
    0.8
    """
    p1, p_plus = np.asarray(p1, float), np.asarray(p_plus, float)
    band = np.sort(p1[(p1 < t) & (p_plus >= t)])[::-1]
    n = int(math.floor(share * len(p1) + 1e-9))
    if not len(band) or n == 0:
        return float(t)
    return float(band[min(n, len(band)) - 1])


def simulate(rows, t, ask_above=0.0):
    """What threshold t does on pins: rows [{p1, p_plus, p2, right1, agree}] (p2: pair's probability with the
    pin's real second answer). -> (accepted, right, asked): an accepted pair keeps the first answer's label.

    >>> rows = [{"p1": 0.9, "p_plus": 0.95, "p2": 0.95, "right1": 1, "agree": True},
    ...         {"p1": 0.6, "p_plus": 0.85, "p2": 0.85, "right1": 1, "agree": True},
    ...         {"p1": 0.6, "p_plus": 0.85, "p2": 0.2, "right1": 0, "agree": False},
    ...         {"p1": 0.3, "p_plus": 0.5, "p2": 0.5, "right1": 0, "agree": True}]
    >>> simulate(rows, 0.8)
    (2, 2, 2)
    """
    acc = right = asked = 0
    for r in rows:
        d = decision(r["p1"], r["p_plus"], t, ask_above)
        asked += d == "ask"
        if d == "accept" or (d == "ask" and r["agree"] and r["p2"] >= t):
            acc += 1
            right += bool(r["right1"])
    return acc, right, asked


def est_yield(p1, p_plus, t, agree_rate, ask_above=0.0):
    """Estimated share accepted over all images: those at or above t, plus the ask band times the chance a
    second answer agrees (agree_rate, from gold).

    >>> est_yield([0.9, 0.6, 0.3, 0.95], [0.95, 0.85, 0.5, 0.99], 0.8, 0.5)
    0.625
    """
    p1, p_plus = np.asarray(p1, float), np.asarray(p_plus, float)
    if not len(p1):
        return 0.0
    band = (p1 < t) & (p_plus >= t) & (p1 >= ask_above)
    return float(((p1 >= t).sum() + agree_rate * band.sum()) / len(p1))


def choose_threshold(pins, p1_all, plus_all, target, min_yield, share):
    """(t, ask_above, mode) from gold pins' rows (see simulate) and every image's p1 and p_plus, with at most
    `share` of the images asked twice. Among thresholds keeping the estimated yield >= min_yield: mode target,
    those whose accepted pins reach target at the lower 95% bound, the lowest at or above VALUE_P (where
    accepting stops paying), else the highest of them; min_yield: none reaches it, so the highest t that keeps
    the yield (the best accepted accuracy there); prior: no pins, so the model's own mean probability over what
    it would accept stands in for them.

    >>> pins = [{"p1": p, "p_plus": p, "p2": p, "right1": r, "agree": True} for p, r in [(0.9, 1)] * 8 + [(0.5, 0)] * 2]
    >>> choose_threshold(pins, [0.9] * 8 + [0.5] * 2, [0.9] * 8 + [0.5] * 2, 0.6, 0.5, 0.0)[::2]
    (0.9, 'target')
    >>> choose_threshold(pins, [0.9] * 8 + [0.5] * 2, [0.9] * 8 + [0.5] * 2, 0.99, 0.5, 0.0)[::2]
    (0.9, 'min_yield')
    """
    from flywheel.quality import wilson_interval
    agree_rate = float(np.mean([bool(r["agree"]) for r in pins])) if pins else 0.5
    p1, plus = np.asarray(p1_all, float), np.asarray(plus_all, float)
    cands = []
    for t in sorted(set(np.concatenate([p1, plus]).tolist()) | {0.0}):  # exact values: a rounded t would drop its own image
        floor = ask_floor(p1, plus, t, share)
        if est_yield(p1, plus, t, agree_rate, floor) >= min_yield:
            cands.append((t, floor))
    if not cands:
        return 0.0, 0.0, "min_yield" if pins else "prior"
    met = []
    for t, floor in cands:  # ascending
        if pins:
            acc, right, _ = simulate(pins, t, floor)
            ok = acc > 0 and wilson_interval(right, acc)[0] >= target
        else:
            kept = np.concatenate([p1[p1 >= t], plus[(p1 < t) & (plus >= t) & (p1 >= floor)]])
            ok = len(kept) > 0 and float(kept.mean()) >= target
        if ok:
            met.append((t, floor))
    if met:
        t, floor = next((c for c in met if c[0] >= VALUE_P), met[-1])
        return t, floor, "target" if pins else "prior"
    return cands[-1][0], cands[-1][1], "min_yield" if pins else "prior"


def cross_validated(evidence, right, classes, signals, folds=CV_FOLDS, seed=0):
    """Out-of-fold probabilities on the pins (each pin judged by a model fitted without it): the check of the
    label model's calibration. -> [n] floats."""
    n = len(evidence)
    out = np.zeros(n)
    order = np.random.default_rng(seed).permutation(n)
    for f in range(min(folds, n)):
        test = order[f::min(folds, n)]
        train = np.setdiff1d(order, test)
        m = fit_model([evidence[i] for i in train], [right[i] for i in train], classes, signals)
        out[test] = [m.p_right(evidence[i]) for i in test]
    return out


def calibration(p, y, bins=5):
    """Brier score, expected calibration error (equal-count bins) and mean probability vs the rate right.

    >>> c = calibration([0.9, 0.9, 0.1, 0.1], [1, 0, 0, 0], bins=2)
    >>> c["brier"], c["ece"], c["mean_p"], c["rate"]
    (0.21, 0.25, 0.5, 0.25)
    """
    p, y = np.asarray(p, float), np.asarray(y, float)
    if not len(p):
        return {"brier": None, "ece": None, "mean_p": None, "rate": None}
    order = np.argsort(p, kind="stable")
    ece = sum(abs(p[b].mean() - y[b].mean()) * len(b) for b in np.array_split(order, bins) if len(b)) / len(p)
    return {"brier": round(float(((p - y) ** 2).mean()), 4), "ece": round(float(ece), 4),
            "mean_p": round(float(p.mean()), 4), "rate": round(float(y.mean()), 4)}


MAX_ASK_SHARE = 0.15  # at most this share of images get a second answer: with gold pins' own second answers
                      # (~0.07 a call an image at 100 of 1,500), a run stays near 1.2 calls an image


def first_only(e: Evidence) -> Evidence:
    return Evidence(e.label, e.confidence, e.logprob, e.held_out)


def fit_label_model(pins, everyone, classes, target, min_yield, share=MAX_ASK_SHARE):
    """The label model from gold pins [(Evidence with its second answer, first answer right?)] and the first
    answers of every image [Evidence] (gold included): both models, the threshold, and the report
    label_summary.json and the datacard show (signals used, AUROC of each on gold, cross-validated
    calibration, the estimate on gold under the rule)."""
    from flywheel.quality import auroc, wilson_interval
    signals = signals_present([e for e, _ in pins] + list(everyone))
    ev, right = [e for e, _ in pins], [bool(r) for _, r in pins]
    first = fit_model([first_only(e) for e in ev], right, classes, signals)
    pair = fit_model(ev, right, classes, [*signals, "agree"])
    lm = LabelModel(first, pair, PRIOR_THRESHOLD, "prior", "", len(pins))
    rows = [{"p1": lm.p1(e), "p_plus": lm.p_if_agree(e), "p2": lm.p_final(e) if e.agree is not None else 0.0,
             "right1": r, "agree": bool(e.agree)} for e, r in zip(ev, right)]
    p1_all, plus_all = [lm.p1(e) for e in everyone], [lm.p_if_agree(e) for e in everyone]
    lm.threshold, lm.ask_above, lm.mode = choose_threshold(rows, p1_all, plus_all, target, min_yield, share)
    ask_above = lm.ask_above
    lm.report = {"signals": signals, "prior_mean": PRIOR_MEAN, "prior_precision": PRIOR_PRECISION,
                 "asked_share_est": round(float(np.mean([decision(a, b, lm.threshold, ask_above) == "ask"
                                                         for a, b in zip(p1_all, plus_all)])) if p1_all else 0.0, 4)}
    if pins:
        k = len(classes)
        lm.report["auroc_on_gold"] = {
            s: None if (a := auroc([raw_feature(s, e, k) for e in ev if raw_feature(s, e, k) is not None],
                                   [r for e, r in zip(ev, right) if raw_feature(s, e, k) is not None])) is None
            else round(a, 4) for s in [*signals, "agree"]}
        oof1 = cross_validated([first_only(e) for e in ev], right, classes, signals)
        oof2 = cross_validated(ev, right, classes, [*signals, "agree"])
        lm.report["auroc_on_gold"]["label_model_cv"] = None if (a := auroc(oof1.tolist(), right)) is None else round(a, 4)
        lm.report["calibration_cv"] = {"first": calibration(oof1, right), "pair": calibration(oof2, right)}
        acc, ok, asked = simulate(rows, lm.threshold, ask_above)
        lo, hi = wilson_interval(ok, acc)
        lm.report["estimate_on_gold"] = {"accepted": acc, "accuracy": round(ok / acc, 4) if acc else None,
                                         "ci95": [round(lo, 4), round(hi, 4)], "yield": round(acc / len(pins), 4)}
    lm.why = why(lm, target, min_yield, ask_above)
    return lm


def why(lm, target, min_yield, ask_above):
    """The rule in force, in one sentence for people."""
    head = {"target": f"the accepted gold labels reach {target} at the lower 95% bound on {lm.n_gold} gold pins, at a "
                      f"threshold of at least {VALUE_P} where the yield allows (below it a label is wrong too often to pay)",
            "min_yield": f"no threshold reaches {target} at the lower 95% bound on {lm.n_gold} gold pins with a yield "
                         f">= {min_yield}, so the rule keeps the best accepted accuracy at that yield",
            "prior": f"no gold pins: the label model is the stated priors (pass --gold_n or --gold_csv to fit it); "
                     f"its own estimate of accepted accuracy is held to {target} at a yield >= {min_yield}"}[lm.mode]
    return (f"label model on {', '.join(lm.first.signals)} (and agreement, after a second answer): a first answer "
            f"whose probability of being right is >= {lm.threshold:.4f} is accepted alone; one between {ask_above:.4f} "
            f"and it gets one more answer when an agreeing one would lift it over; the rest go to review. {head}")

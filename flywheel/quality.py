"""Label-quality signals and the acceptance rule fitted on gold pins: pure functions.

The fitted rule ("--second_pass fitted") has one knob, a threshold t on the first answer's score
(its stated confidence, ties broken by a hash of the image, see `score`):
  - a first answer scoring >= t is accepted alone (one paid call);
  - any other image gets a second answer (another class order at --second_temp, or --second_model),
    and is accepted only when the two agree;
  - everything else goes to review.
t is the lowest threshold (the fewest second calls) at which the labels the rule accepts on the gold
pins (singles above t, agreeing pairs below) reach --target_label_precision at the *lower* 95% Wilson
bound, not at the point estimate; if none does, every image gets a second answer. Gold items always
get both answers, so every threshold can be judged on them.

When stated confidence barely separates right from wrong on gold (AUROC below CONF_AUROC_MIN), it is
not trusted as confidence: the log and label_summary.json say so, and the threshold then only picks a
random share of images to check (the hash tie-break), sized so the accepted labels still reach the
target on gold. Shortcut taken: stated confidence is the only per-image signal; the student's
out-of-sample disagreement (confident learning) is not used.
"""
import math
from dataclasses import asdict, dataclass

from flywheel.io import stable_unit

TIE_BREAK = 1e-4  # stated confidences come with <= 3 decimals: the hash only orders equal ones
CONF_AUROC_MIN = 0.6  # below this, stated confidence is treated as uninformative (verbalised-confidence literature: ~0.55-0.6)
Z95 = 1.959964


def wilson_interval(k, n, z=Z95):
    """95% Wilson score interval for k successes in n trials; (0, 1) when n = 0.

    >>> [round(x, 4) for x in wilson_interval(45, 50)]
    [0.7864, 0.9565]
    >>> wilson_interval(0, 0)
    (0.0, 1.0)
    """
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def auroc(scores, positive):
    """Probability that a random positive scores above a random negative (ties count half);
    None when either group is empty.

    >>> auroc([0.9, 0.8, 0.7, 0.6], [1, 1, 0, 0]), auroc([0.95, 0.95, 0.95], [1, 0, 1])
    (1.0, 0.5)
    """
    pos = [s for s, y in zip(scores, positive) if y]
    neg = [s for s, y in zip(scores, positive) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


@dataclass
class QCRule:
    threshold: float          # accept a first answer alone at score >= this (inf: never)
    trusted_confidence: bool  # False: stated confidence does not separate right from wrong on gold
    auroc: float              # of stated confidence for "first answer right", on gold (None if undefined)
    n_gold: int
    target: float
    why: str
    estimate: dict            # accepted-label accuracy on gold under this rule, with a 95% interval

    def to_json(self):
        d = asdict(self)
        d["threshold"] = None if math.isinf(self.threshold) else self.threshold
        return d


def score(conf1, sha, seed=0):
    """The first answer's score: its stated confidence, ties broken by a hash of the image.

    >>> score(0.95, "a") != score(0.95, "b"), 0.95 <= score(0.95, "a") < 0.9501
    (True, True)
    """
    return float(conf1) + TIE_BREAK * stable_unit(seed, "tie", sha)


def rule_accepts(s1, agree, threshold):
    """What the fitted rule does with one image: 'single' (accept the first answer), 'pair' (second
    answer agrees), or None (review). s1 is the first answer's score; agree is None when there is no
    second answer.

    >>> rule_accepts(0.97, None, 0.9), rule_accepts(0.5, True, 0.9), rule_accepts(0.5, False, 0.9)
    ('single', 'pair', None)
    """
    if s1 >= threshold:
        return "single"
    return "pair" if agree else None


def fit_rule(gold, target):
    """Fit the threshold on gold pins. gold: [{score, conf1, right1, agree, right_pair}] per gold image
    (score defaults to conf1), where right1 says the first answer matched gold, agree that the second
    answer named the same label, and right_pair that the agreed label matched gold.

    >>> g = [{"conf1": c, "right1": r, "agree": r, "right_pair": r} for c, r in
    ...      [(0.99, 1)] * 40 + [(0.7, 1)] * 5 + [(0.6, 0)] * 5]
    >>> r = fit_rule(g, 0.9); r.threshold, r.trusted_confidence, r.estimate["accuracy"], r.estimate["yield"]
    (0.7, True, 1.0, 0.9)

    (At t = 0.6 all 50 are accepted alone, 45 right: Wilson lower 0.786 < 0.9. At t = 0.7 the five at 0.6
    get a second answer, which disagrees, so 45 of 45 accepted are right: lower 0.921 >= 0.9.)
    >>> flat = [{"conf1": 0.95, "right1": i % 5 != 0, "agree": i % 5 != 0, "right_pair": True} for i in range(50)]
    >>> r = fit_rule(flat, 0.9); r.trusted_confidence, r.threshold
    (False, inf)
    """
    gold = [{**g, "score": g.get("score", g["conf1"])} for g in gold]
    n = len(gold)
    a = auroc([g["conf1"] for g in gold], [g["right1"] for g in gold])
    trusted = a is not None and a >= CONF_AUROC_MIN
    threshold = math.inf
    for t in sorted({g["score"] for g in gold}) + [math.inf]:
        e = estimate_on_gold(gold, t)
        lo = wilson_interval(round(e["accuracy"] * e["accepted"]), e["accepted"])[0] if e["accepted"] else 0.0
        if lo >= target:
            threshold = t
            break
    if n == 0:
        why = "no gold pins: every image gets a second answer (pass --gold_n or --gold_csv to fit the rule)"
    elif math.isinf(threshold):
        why = (f"no threshold makes the accepted gold labels reach {target} at the lower 95% bound on {n} gold "
               f"pins: every image gets a second answer")
    else:
        why = (f"first answers scoring >= {threshold:.4f} are accepted alone, the rest need an agreeing second "
               f"answer: the accepted gold labels reach {target} at the lower 95% bound on {n} gold pins")
    if n and not trusted:
        why += (f"; stated confidence does not separate right from wrong (AUROC {'n/a' if a is None else f'{a:.2f}'}"
                f" < {CONF_AUROC_MIN}), so it is not trusted as confidence: the threshold only picks a random share "
                f"of images to check")
    elif n:
        why += f" (stated-confidence AUROC {a:.2f})"
    return QCRule(threshold, trusted, a, n, target, why, estimate_on_gold(gold, threshold))


def estimate_on_gold(gold, threshold):
    """Accuracy of the labels the rule accepts on gold, with a 95% Wilson interval, and its yield.

    >>> e = estimate_on_gold([{"conf1": 0.9, "right1": 1, "agree": None, "right_pair": None},
    ...                       {"conf1": 0.5, "right1": 0, "agree": True, "right_pair": 0},
    ...                       {"conf1": 0.5, "right1": 0, "agree": False, "right_pair": None}], 0.8)
    >>> e["accepted"], e["accuracy"], e["yield"]
    (2, 0.5, 0.667)
    """
    right = acc = 0
    for g in gold:
        how = rule_accepts(g.get("score", g["conf1"]), g["agree"], threshold)
        if how is None:
            continue
        acc += 1
        right += bool(g["right1"] if how == "single" else g["right_pair"])
    lo, hi = wilson_interval(right, acc)
    return {"accepted": acc, "accuracy": round(right / acc, 4) if acc else None, "ci95": [round(lo, 4), round(hi, 4)],
            "yield": round(acc / len(gold), 3) if gold else None}

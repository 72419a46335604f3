"""Label-quality signals and the acceptance rule fitted on gold pins: pure functions.

The fitted rule ("--second_pass fitted") has one knob, a stated-confidence threshold t:
  - a first answer with confidence >= t is accepted alone (one paid call);
  - any other image gets a second answer (another class order at --second_temp, or --second_model),
    and is accepted only when the two agree;
  - everything else goes to review.
t is the lowest threshold whose accepted gold answers reach --target_label_precision at the *lower*
95% Wilson bound, not at the point estimate. When no threshold does, or the confidence barely
separates right from wrong on gold (AUROC below CONF_AUROC_MIN), stated confidence is not trusted:
every image gets the second answer. Gold items always get both answers, so the rule can be fitted
and audited. Shortcut taken: one signal (stated confidence) picks who gets the second call; the
student's out-of-sample disagreement (confident learning) is not used here.
"""
import math
from dataclasses import asdict, dataclass

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
    threshold: float          # accept a first answer alone at confidence >= this (inf: never)
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


def rule_accepts(conf1, agree, threshold):
    """What the fitted rule does with one image: 'single' (accept the first answer), 'pair' (second
    answer agrees), or None (review). agree is None when there is no second answer.

    >>> rule_accepts(0.97, None, 0.9), rule_accepts(0.5, True, 0.9), rule_accepts(0.5, False, 0.9)
    ('single', 'pair', None)
    """
    if conf1 >= threshold:
        return "single"
    return "pair" if agree else None


def fit_rule(gold, target):
    """Fit the threshold on gold pins. gold: [{conf1, right1, agree, right_pair}] per gold image, where
    right1 says the first answer matched gold, agree that the second answer named the same label, and
    right_pair that the agreed label matched gold.

    >>> g = [{"conf1": c, "right1": r, "agree": True, "right_pair": r} for c, r in
    ...      [(0.99, 1)] * 40 + [(0.7, 1)] * 5 + [(0.6, 0)] * 5]
    >>> r = fit_rule(g, 0.9); r.threshold, r.trusted_confidence, r.estimate["accuracy"]  # 45/45 at >= 0.7:
    (0.7, True, 0.9)

    (Wilson lower bound of 45/45 is 1 / (1 + 1.96^2 / 45) = 0.921 >= 0.9; the 5 wrong at 0.6 go to a
    second answer, which agrees on a wrong label, so 45 of the 50 accepted are right.)
    >>> flat = [{"conf1": 0.95, "right1": i % 5 != 0, "agree": i % 5 != 0, "right_pair": True} for i in range(50)]
    >>> r = fit_rule(flat, 0.9); r.threshold, r.trusted_confidence
    (inf, False)
    """
    n = len(gold)
    a = auroc([g["conf1"] for g in gold], [g["right1"] for g in gold])
    threshold, why = math.inf, ""
    if n == 0:
        why = "no gold pins: every image gets a second answer (pass --gold_n or --gold_csv to fit the rule)"
    elif a is None:
        why = f"first answers on the {n} gold pins are all right or all wrong: confidence cannot be judged"
    elif a < CONF_AUROC_MIN:
        why = (f"stated confidence barely separates right from wrong on {n} gold pins (AUROC {a:.2f} < "
               f"{CONF_AUROC_MIN}): it is not trusted, every image gets a second answer")
    else:
        for t in sorted({g["conf1"] for g in gold}):
            sel = [g for g in gold if g["conf1"] >= t]
            lo, _ = wilson_interval(sum(g["right1"] for g in sel), len(sel))
            if lo >= target:
                threshold = t
                break
        why = (f"first answers at confidence >= {threshold:g} reach {target} precision at the lower 95% bound on "
               f"{n} gold pins (AUROC {a:.2f})" if not math.isinf(threshold) else
               f"no confidence threshold reaches {target} precision at the lower 95% bound on {n} gold pins "
               f"(AUROC {a:.2f}): every image gets a second answer")
    return QCRule(threshold, not math.isinf(threshold), a, n, target, why, estimate_on_gold(gold, threshold))


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
        how = rule_accepts(g["conf1"], g["agree"], threshold)
        if how is None:
            continue
        acc += 1
        right += bool(g["right1"] if how == "single" else g["right_pair"])
    lo, hi = wilson_interval(right, acc)
    return {"accepted": acc, "accuracy": round(right / acc, 4) if acc else None, "ci95": [round(lo, 4), round(hi, 4)],
            "yield": round(acc / len(gold), 3) if gold else None}

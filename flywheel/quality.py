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
target on gold.

A second, free signal is the student's out-of-sample disagreement (confident learning; the score is
cleanlab's default label-quality score, "self_confidence"): a quick model of the first answers judges
each image without having seen its label (a multinomial logistic regression trained in K folds on 12x12
pixels or on embeddings, or the labels of the image's nearest neighbours; see HELD_OUT), and cl_conf is
its probability of the given label.
Labels with cl_conf below a cut are *flagged*: they get no second call and go to review, never
silently kept. The cut is fitted on gold too: among "no flags" and the FLAG_SHARES quantiles of cl_conf,
the rule keeps the one whose threshold (as above) gives the fewest paid calls per accepted gold label.
Flags are considered only when gold shows the score separates right from wrong (AUROC >=
CONF_AUROC_MIN); otherwise the log and label_summary.json say so. These few lines replace a cleanlab
dependency (which pulls in pandas) for the one score used. Choosing among the cuts on the same gold
makes the lower bound slightly optimistic; label_summary.json's measured figure (when the manifest has
ground truth) is the check.
"""
import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

from flywheel.io import stable_unit, write_csv

FLAG_SHARES = (0.05, 0.1, 0.15, 0.2)  # candidate shares of images to flag (quantiles of the held-out score)
CL_MIN_ITEMS, CL_FOLDS, CL_PIXELS = 50, 5, 12  # fewest first answers to train on; folds; feature side (px)
CL_MAX_TRAIN = 20_000  # each fold's model trains on at most this many items (a sample): heap and time stay flat
CL_CHUNK = 8192        # items scored at once
TIE_BREAK = 1e-4  # stated confidences come with <= 3 decimals: the hash only orders equal ones
# the held-out model's candidates, cheaper first: {name: (how it reads an image, how it judges a label)}.
# logistic: a logistic regression trained in folds; neighbours: the labels of the image's nearest other images
HELD_OUT = {"pixels": ("pixels", "logistic"), "embeddings": ("embeddings", "logistic"),
            "neighbours": ("embeddings", "neighbours")}
REPRESENTATIONS = tuple(HELD_OUT)  # the candidates a label step may try (label_summary.json's "representation")
# without gold nothing can compare them, so the held-out model is the first available of these. On real images
# (bench/held_out_bench.py: Fashion-MNIST's allowed classes and scikit-learn's digits, two SIMULATED teachers, 3
# seeds each, 1,200-1,500 first answers) the neighbours separated right first answers from wrong ones best in 10
# of 12 runs (AUROC 0.91-0.97, against 0.82-0.94 for a logistic regression on the same embeddings and 0.73-0.98
# on pixels; the two losses, by under 0.01, were digits with errors drawn by chance): a logistic regression learns
# a teacher's consistent errors from its labels, neighbours only read what similar images were called
NO_GOLD_ORDER = ("neighbours", "embeddings", "pixels")
CL_NEIGHBOURS = 20  # neighbours voting on each label (10, 20 and 40 were within 0.02 AUROC of each other there)
CL_NN_CHUNK = 256  # items compared with the references at once: [256, 20,000] similarities (20 MB), their order (41 MB)
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
    student: dict = None      # the held-out model's signal as judged on gold, and the flag cut chosen; or None

    @property
    def flag_below(self):
        """Flag (send to review) first answers whose held-out score is below this; None: no flags."""
        return (self.student or {}).get("flag_below")

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


def rule_accepts(s1, agree, threshold, flagged=False):
    """What the fitted rule does with one image: 'single' (accept the first answer), 'pair' (second
    answer agrees), or None (review). s1 is the first answer's score; agree is None when there is no
    second answer; a flagged image (the held-out model contradicts its label) always goes to review.

    >>> rule_accepts(0.97, None, 0.9), rule_accepts(0.5, True, 0.9), rule_accepts(0.5, False, 0.9)
    ('single', 'pair', None)
    >>> rule_accepts(0.97, None, 0.9, flagged=True) is None
    True
    """
    if flagged:
        return None
    if s1 >= threshold:
        return "single"
    return "pair" if agree else None


def lowest_threshold(gold, target):
    """The lowest score threshold at which the labels the rule accepts on gold reach target at the lower
    95% Wilson bound (inf: none does, every image gets a second answer).

    >>> g = [{"score": c, "right1": r, "agree": r, "right_pair": r} for c, r in [(0.99, 1)] * 40 + [(0.6, 0)] * 5]
    >>> lowest_threshold(g, 0.9), lowest_threshold(g, 0.99)
    (0.99, inf)
    """
    for t in sorted({g["score"] for g in gold}) + [math.inf]:
        e = estimate_on_gold(gold, t)
        lo = wilson_interval(round(e["accuracy"] * e["accepted"]), e["accepted"])[0] if e["accepted"] else 0.0
        if lo >= target:
            return t
    return math.inf


def calls_per_accepted(gold, threshold):
    """Paid calls per accepted label on gold under the rule: one first answer per image, a second for
    each unflagged image scoring below the threshold (flagged ones go to review uncalled).

    >>> g = [{"score": 0.9, "flagged": False, "agree": None, "right1": 1}, {"score": 0.5, "flagged": False, "agree": True,
    ...       "right1": 1, "right_pair": 1}, {"score": 0.5, "flagged": True, "agree": None, "right1": 0}]
    >>> calls_per_accepted(g, 0.8)   # 3 first answers + 1 second, 2 accepted
    2.0
    """
    calls = len(gold) + sum(1 for g in gold if not g.get("flagged") and g["score"] < threshold)
    acc = estimate_on_gold(gold, threshold)["accepted"]
    return calls / acc if acc else math.inf


def fit_rule(gold, target, flag_cuts=()):
    """Fit the rule on gold pins. gold: [{score, conf1, right1, agree, right_pair[, cl_conf]}] per gold
    image (score defaults to conf1), where right1 says the first answer matched gold, agree that the
    second answer named the same label, right_pair that the agreed label matched gold, and cl_conf is the
    held-out model's probability of the first answer's label. flag_cuts: candidate cuts on cl_conf
    (quantiles over every image judged); each is tried, with its lowest threshold, when the held-out
    score is trusted, and the cheapest per accepted gold label wins.

    >>> g = [{"conf1": c, "right1": r, "agree": r, "right_pair": r} for c, r in
    ...      [(0.99, 1)] * 40 + [(0.7, 1)] * 5 + [(0.6, 0)] * 5]
    >>> r = fit_rule(g, 0.9); r.threshold, r.trusted_confidence, r.estimate["accuracy"], r.estimate["yield"]
    (0.7, True, 1.0, 0.9)

    (At t = 0.6 all 50 are accepted alone, 45 right: Wilson lower 0.786 < 0.9. At t = 0.7 the five at 0.6
    get a second answer, which disagrees, so 45 of 45 accepted are right: lower 0.921 >= 0.9.)
    >>> flat = [{"conf1": 0.95, "right1": i % 5 != 0, "agree": i % 5 != 0, "right_pair": True} for i in range(50)]
    >>> r = fit_rule(flat, 0.9); r.trusted_confidence, r.threshold
    (False, inf)

    A held-out score that is low on the wrong answers: flagging below 0.5 needs no second call at all
    (50 calls for 40 accepted, 1.25 per label, against 100 for 40 with no flags):
    >>> scored = [{**x, "cl_conf": 0.9 if x["right1"] else 0.1} for x in flat]
    >>> r = fit_rule(scored, 0.9, flag_cuts=[0.5]); r.flag_below, r.threshold == 0.95, r.estimate["yield"]
    (0.5, True, 0.8)
    """
    gold = [{**g, "score": g.get("score", g["conf1"]), "flagged": False} for g in gold]
    n = len(gold)
    a = auroc([g["conf1"] for g in gold], [g["right1"] for g in gold])
    trusted = a is not None and a >= CONF_AUROC_MIN
    student, cut = None, None
    threshold = lowest_threshold(gold, target)
    if any(g.get("cl_conf") is not None for g in gold):
        sa = auroc([g["cl_conf"] for g in gold if g.get("cl_conf") is not None],
                   [g["right1"] for g in gold if g.get("cl_conf") is not None])
        s_trusted = sa is not None and sa >= CONF_AUROC_MIN
        best = (calls_per_accepted(gold, threshold), None, threshold)
        for c in (flag_cuts if s_trusted else ()):
            flagged = [{**g, "flagged": g.get("cl_conf") is not None and g["cl_conf"] < c} for g in gold]
            t = lowest_threshold(flagged, target)
            if not math.isinf(t) and calls_per_accepted(flagged, t) < best[0] - 1e-9:
                best = (calls_per_accepted(flagged, t), c, t)
        _, cut, threshold = best
        if cut is not None:
            gold = [{**g, "flagged": g.get("cl_conf") is not None and g["cl_conf"] < cut} for g in gold]
        shown = "n/a" if sa is None else f"{sa:.2f}"
        if not s_trusted:
            swhy = (f"the held-out model's score does not separate right from wrong on gold (AUROC {shown} < "
                    f"{CONF_AUROC_MIN}): no label is flagged by it")
        elif cut is None:
            swhy = f"the held-out model's score (AUROC {shown} on gold) flags nothing: no cut made labels cheaper"
        else:
            nf = sum(g["flagged"] for g in gold)
            swhy = (f"labels the held-out model gives probability < {cut:.4f} go to review uncalled (AUROC {shown} "
                    f"on gold; {sum(not g['right1'] for g in gold if g['flagged'])} of {nf} flagged gold answers wrong)")
        student = {"auroc": None if sa is None else round(sa, 4), "trusted": s_trusted,
                   "flag_below": None if cut is None else round(cut, 6), "why": swhy}
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
    if student:
        why += "; " + student["why"]
    return QCRule(threshold, trusted, a, n, target, why, estimate_on_gold(gold, threshold), student)


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
        how = rule_accepts(g["score"] if "score" in g else g["conf1"], g["agree"], threshold, g.get("flagged", False))
        if how is None:
            continue
        acc += 1
        right += bool(g["right1"] if how == "single" else g["right_pair"])
    lo, hi = wilson_interval(right, acc)
    return {"accepted": acc, "accuracy": round(right / acc, 4) if acc else None, "ci95": [round(lo, 4), round(hi, 4)],
            "yield": round(acc / len(gold), 3) if gold else None}


# ----------------------------------------------------------------------------- the held-out model

def out_of_fold_probs(x, y, k, folds=CL_FOLDS, seed=0, max_train=CL_MAX_TRAIN):
    """[n, k] probabilities for each item from a logistic regression trained on the other folds (so no item
    is judged by a model that saw its label), on a sample of at most max_train of them, scored in chunks.
    x [n, d] float features (float16 embeddings too, read as float32 a few rows at a time), or uint8 pixels
    (read as /255 in float32 likewise, so the heap holds 1 byte a feature), y [n] ints in [0, k)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    y = np.asarray(y)
    counts = np.bincount(y, minlength=k)
    smallest = counts[counts > 0].min()
    folds = int(max(2, min(folds, smallest)))
    out = np.zeros((len(y), k))
    rng = np.random.default_rng(seed)
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y):
        if len(tr) > max_train:
            tr = np.sort(rng.choice(tr, max_train, replace=False))
        m = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=300))
        m.fit(_as_float(x[tr]), y[tr])
        for start in range(0, len(te), CL_CHUNK):
            part = te[start:start + CL_CHUNK]
            out[np.ix_(part, m.classes_)] = m.predict_proba(_as_float(x[part]))
    return out


def neighbour_probs(x, y, k, neighbours=CL_NEIGHBOURS, seed=0, max_ref=CL_MAX_TRAIN):
    """[n, k] probabilities for each item from the labels of its `neighbours` most similar other items (cosine
    similarity), searched among a sample of at most max_ref items: each class's share of their votes, plus half
    a vote for every class so no label is judged impossible. An item never votes on itself, so, as in folds, no
    label is judged by a model that saw it. x [n, d] features (float16 or uint8 read as in out_of_fold_probs),
    y [n] ints in [0, k). Item 2 is near items 0 and 1, both labeled 0, so its label 1 gets (0 + 0.5) / 3:

    >>> x = np.array([[1, 0], [1, 0.1], [1, 0.2], [0, 1], [0.1, 1]])
    >>> neighbour_probs(x, np.array([0, 0, 1, 1, 1]), 2, neighbours=2).round(3)[2]
    array([0.833, 0.167])
    """
    y = np.asarray(y)
    n = len(y)
    ref = np.arange(n) if n <= max_ref else np.sort(np.random.default_rng(seed).choice(n, max_ref, replace=False))
    refs, ref_y = _unit(x[ref]), y[ref]  # [m, d] float32, [m]
    votes = max(1, min(neighbours, len(ref) - 1))  # n >= 2: someone else to vote
    out = np.empty((n, k))
    for start in range(0, n, CL_NN_CHUNK):
        q = np.arange(start, min(n, start + CL_NN_CHUNK))
        sim = _unit(x[q]) @ refs.T  # [c, m]
        at = np.minimum(np.searchsorted(ref, q), len(ref) - 1)
        own = ref[at] == q  # the query is itself a reference: it must not vote on its own label
        sim[np.flatnonzero(own), at[own]] = -np.inf
        top = ref_y[np.argpartition(sim, -votes, axis=1)[:, -votes:]]  # [c, votes] the neighbours' labels
        out[q] = (np.stack([(top == c).sum(1) for c in range(k)], 1) + 0.5) / (votes + 0.5 * k)
    return out


def held_out_probs(name, x, y, k, seed=0):
    """[n, k] probabilities from the HELD_OUT candidate `name`, given the images read its way (x)."""
    judge = neighbour_probs if HELD_OUT[name][1] == "neighbours" else out_of_fold_probs
    return judge(x, y, k, seed=seed)


def _unit(x):
    """float32 rows scaled to length 1 (an all-zero row stays zero)."""
    x = _as_float(x)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _as_float(x):
    """float32 rows of uint8 pixels (/ 255) or float16 embeddings: converted a chunk at a time."""
    return x.astype(np.float32) / 255 if x.dtype == np.uint8 else x.astype(np.float32, copy=False)


def pixel_features(files, side=CL_PIXELS, desc="held-out model: features"):
    """[n, side*side*3] uint8: each image shrunk to side x side RGB, a cheap, label-free representation for
    the held-out model (432 bytes an image; out_of_fold_probs reads them as float32 / 255)."""
    from PIL import Image
    from tqdm import tqdm
    out = np.zeros((len(files), side * side * 3), np.uint8)
    for i, f in enumerate(tqdm(files, desc=desc, unit="img", leave=False)):
        with Image.open(f) as im:
            out[i] = thumbnail(im, side)
    return out


def thumbnail(img, side=CL_PIXELS):
    """A PIL image -> uint8 [side*side*3]: shrunk to side x side RGB (bilinear), rows then columns then colour."""
    from PIL import Image
    return np.asarray(img.convert("RGB").resize((side, side), Image.BILINEAR)).reshape(-1)


# ----------------------------------------------------------------------------- the label step's gold and flags

log = logging.getLogger(__name__)


class HeldOut(NamedTuple):
    """The held-out model's view of one first answer."""
    path: str
    llm_label: str
    p_label: float        # held-out probability of the teacher's first-answer label (the score)
    student_label: str    # the held-out model's top class
    p_student: float      # and its probability


def gold_pins(gitems, gold, teacher, ledger, qc, scores=None):
    """[{conf1, score, right1, agree, right_pair[, cl_conf]}] for gold items with a first answer: what
    fit_rule needs. scores: held_out_scores' output (None: no held-out model)."""
    out = []
    for it in gitems:
        p1 = ledger.ok(qc.call(it["sha256"], 1, teacher.model).key)
        p2 = ledger.ok(qc.call(it["sha256"], 2, teacher.model).key)
        if p1 is None:
            continue
        truth = gold[it["path"]]
        agree = None if p2 is None else p2["label"] == p1["label"]
        g = {"conf1": float(p1["confidence"]), "score": score(p1["confidence"], it["sha256"], qc.seed),
             "right1": p1["label"] == truth, "agree": agree, "right_pair": bool(agree) and p1["label"] == truth}
        if scores and it["sha256"] in scores:
            g["cl_conf"] = scores[it["sha256"]].p_label
        out.append(g)
    return out


class Judged(NamedTuple):
    """The held-out model's judgement of every first answer, and which image representation made it."""
    scores: dict          # {sha256: HeldOut}
    representation: str   # a HELD_OUT name: pixels | embeddings (logistic on each) | neighbours (in the embeddings)
    auroc: dict           # {representation: AUROC on gold of p_label for "first answer right"} for each tried


def held_out_scores(classes, seed, items, teacher, ledger, qc, gold=None, representations=None):
    """The student's out-of-sample disagreement: a model of the teacher's first answers judges each label
    without having seen it. The candidates (HELD_OUT): a logistic regression trained in folds on 12x12
    pixels, the same on the pretrained backbone's ImageNet embeddings when it is installed, and the
    embeddings' nearest neighbours. Gold ({path: label}) picks the one whose scores separate right first
    answers from wrong ones best (the cheaper on a tie). Gold items' labels here are first answers too, so
    judging the score on gold stays honest. Without gold only the first available candidate in NO_GOLD_ORDER
    is computed and used. -> Judged, or None when there are too few first answers to train on."""
    got = [(it, rec) for it in items if (rec := ledger.ok(qc.call(it["sha256"], 1, teacher.model).key)) is not None]
    y = np.array([classes.index(rec["label"]) for _, rec in got])
    if len(got) < CL_MIN_ITEMS or len(set(y.tolist())) < 2:
        log.info("held-out model skipped: %d first answers (needs >= %d in 2+ classes)", len(got), CL_MIN_ITEMS)
        return None
    tried, aurocs, read = {}, {}, {}  # read: {how an image is read: features}, each computed once
    reps = representations or REPRESENTATIONS
    if not gold:
        reps = [r for r in NO_GOLD_ORDER if r in reps]
    for rep in reps:
        if tried and not gold:
            break  # nothing to choose by: the first available one
        t0 = time.time()
        reading, judge = HELD_OUT[rep]
        if reading not in read:
            read[reading] = represent(reading, [it["file"] for it, _ in got])
        x = read[reading]
        if x is None:
            continue
        probs = held_out_probs(rep, x, y, len(classes), seed=seed)
        tried[rep] = {it["sha256"]: HeldOut(it["path"], rec["label"], round(float(pr[k]), 6), classes[int(pr.argmax())],
                                            round(float(pr.max()), 6))
                      for (it, rec), pr, k in zip(got, probs, y)}
        on_gold = [(h.p_label, h.llm_label == gold[h.path]) for h in tried[rep].values() if gold and h.path in gold]
        aurocs[rep] = auroc([a for a, _ in on_gold], [b for _, b in on_gold])
        log.info("held-out model %s (%s, %s) on %d first answers in %.1fs; AUROC on gold %s", rep, reading, judge,
                 len(got), time.time() - t0, "n/a" if aurocs[rep] is None else f"{aurocs[rep]:.3f}")
    best = max(tried, key=lambda r: (aurocs[r] or 0.0, -list(tried).index(r)))
    return Judged(tried[best], best, aurocs)


def represent(reading, files):
    """Images as the held-out model reads them: uint8 thumbnails (pixels) or float embeddings; None when the
    embeddings are not available here."""
    if reading == "pixels":
        return pixel_features(files)
    from flywheel.inference import embed_files  # torch and the backbone: only when embeddings are asked for
    try:
        return embed_files(files)
    except ImportError as e:  # no pretrained backbone installed
        log.info("held-out model: no embeddings (%s); pixels only", e)
        return None


def flag_cuts(scores):
    """Candidate cuts on the held-out score: its FLAG_SHARES quantiles over every image judged."""
    if not scores:
        return []
    return [float(q) for q in np.quantile([h.p_label for h in scores.values()], FLAG_SHARES)]


FLAG_FIELDS = ["path", "sha256", "llm_label", "p_label", "student_label", "p_student"]


def write_flags(path, scores, cut):
    """label_flags.csv: the labels sent to review because the held-out model gives them < cut.
    -> the flagged images' sha256s."""
    rows = [{"sha256": sha, **h._asdict()} for sha, h in (scores or {}).items() if cut is not None and h.p_label < cut]
    write_csv(path, FLAG_FIELDS, rows)
    return {r["sha256"] for r in rows}


def gold_check(gold, answers, classes):
    """Teacher ({path: label, "" when unanswered}) vs gold labels; an unanswered item counts as wrong.

    >>> g = gold_check({"a": "x", "b": "y"}, {"a": "x", "b": ""}, ["x", "y"])
    >>> g["accuracy"], g["confusions"]
    (0.5, {'y -> no answer': 1})
    """
    n = len(gold)
    got = {p: answers.get(p) or "" for p in gold}
    right = sum(got[p] == lab for p, lab in gold.items())
    conf = Counter(f"{lab} -> {got[p] or 'no answer'}" for p, lab in gold.items() if got[p] != lab)
    per_class = {c: {d: sum(1 for p, lab in gold.items() if lab == c and got[p] == d) for d in classes + [""]}
                 for c in classes}
    return {"n": n, "accuracy": right / n if n else 0.0, "confusions": dict(conf.most_common()),
            "per_class_confusion": per_class}

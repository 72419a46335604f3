"""Real images this machine has offline, for benches: Debian's dataset-fashion-mnist restricted to the five
classes the project may use (trouser, dress, sandal, sneaker, ankle boot; the other five are held back for
the maintainers' own measurements and are never read), and scikit-learn's digits. And a stand-in teacher
that errs as a real classifier does: a logistic regression trained on a few held-out images, whose
predictions (and probabilities, as stated confidence) answer for the images it never saw.
"""
import gzip
import io
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_ALLOWED = {1: "trouser", 3: "dress", 5: "sandal", 7: "sneaker", 9: "ankle_boot"}  # label -> class


def _idx(path):
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion(split):
    """-> (uint8 [N, 28, 28] images, [N] class names) of the allowed classes only ("train" or "test")."""
    prefix = "train" if split == "train" else "t10k"
    if not (FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz").exists():
        raise SystemExit(f"error: {FASHION_DIR} is missing; install it with `apt-get install dataset-fashion-mnist`")
    x, y = _idx(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz"), _idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz")
    keep = np.isin(y, list(FASHION_ALLOWED))  # the held-back classes are dropped here, before anything sees them
    return x[keep], np.array([FASHION_ALLOWED[int(v)] for v in y[keep]])


def digits():
    """-> (uint8 [1797, 8, 8] images on 0-255, [1797] digit names)."""
    from sklearn.datasets import load_digits
    from flywheel.data import DIGIT_NAMES
    d = load_digits()
    return np.round(d.images * 255 / 16).astype(np.uint8), np.array([DIGIT_NAMES[t] for t in d.target])


def sample(x, y, per_class, rng, exclude=()):
    """Indices: per_class of each class, drawn with rng, none from exclude."""
    out = []
    for c in sorted(set(y)):
        idx = np.setdiff1d(np.flatnonzero(y == c), np.asarray(list(exclude), dtype=int))
        out += rng.choice(idx, min(per_class, len(idx)), replace=False).tolist()
    return np.array(sorted(out))


def write_folder(root, parts):
    """parts: {split: (images uint8 [N, h, w], names [N], ids [N])} -> root/<split>/<class>/<id>.png (RGB)."""
    for split, (x, names, ids) in parts.items():
        for img, c, i in zip(x, names, ids):
            dst = Path(root) / split / c / f"{i:06d}.png"
            dst.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            Image.fromarray(img).convert("RGB").save(buf, format="PNG")
            dst.write_bytes(buf.getvalue())


class ClassifierTeacher:
    """A stand-in teacher (SIMULATED) whose errors are a real classifier's: logistic regression on the pixels
    of fit_x (held-out images, never labeled by the bench), answering each image with its prediction and
    stated confidence = its probability for that answer."""

    def __init__(self, fit_x, fit_y, seed=0):
        from sklearn.linear_model import LogisticRegression
        self.model = LogisticRegression(C=0.05, max_iter=2000, random_state=seed).fit(self._f(fit_x), fit_y)

    @staticmethod
    def _f(x):
        return x.reshape(len(x), -1).astype(np.float32) / 255

    def answer(self, x):
        """-> [(label, confidence)] for images x."""
        p = self.model.predict_proba(self._f(x))
        return [(str(self.model.classes_[k]), round(float(p[i, k]), 4)) for i, k in enumerate(p.argmax(1))]


class ConfusionTeacher:
    """A second stand-in teacher (SIMULATED) whose errors follow a real classifier's confusions but not its
    per-image quirks: ClassifierTeacher (fitted on fit_x) is scored on held-out images (held_x, never labeled
    by the bench); each image of true class i is then answered j with that classifier's held-out rate
    P(j | i), and its stated confidence is drawn from the classifier's own confidences on held-out answers that
    were right (when the drawn answer is right) or wrong (when it is wrong). The errors are class-conditional:
    which image of a class gets one is chance, so a student cannot learn them from the pixels, while the
    confidence signal keeps the classifier's strength. It reads the true class of each image it answers."""

    def __init__(self, fit_x, fit_y, held_x, held_y, seed=0):
        self.rng = np.random.default_rng(seed)
        base = ClassifierTeacher(fit_x, fit_y, seed)
        ans = base.answer(held_x)
        self.classes = [str(c) for c in base.model.classes_]
        k = {c: i for i, c in enumerate(self.classes)}
        self.confusion = np.zeros((len(k), len(k)))  # [true, answered] held-out rates, rows sum to 1
        for (lab, _), truth in zip(ans, held_y):
            self.confusion[k[str(truth)], k[lab]] += 1
        self.confusion /= self.confusion.sum(1, keepdims=True)
        right = np.array([lab == str(t) for (lab, _), t in zip(ans, held_y)])
        conf = np.array([c for _, c in ans])
        self.conf_right, self.conf_wrong = conf[right], conf[~right]

    def answer(self, y):
        """-> [(label, confidence)] for images of true classes y."""
        out = []
        for truth in y:
            i = self.classes.index(str(truth))
            j = int(self.rng.choice(len(self.classes), p=self.confusion[i]))
            pool = self.conf_right if j == i else self.conf_wrong
            out.append((self.classes[j], float(self.rng.choice(pool))))
        return out


def make_data(d, a, seed):
    """The bench's image folder d/data (train: a.train_per_class, test: a.test_per_class per class of a.dataset,
    fashion | digits) and the stand-in teacher's (a.teacher) answers {file name: (label, confidence)}, fitted on
    a.teacher_fit other images per class. -> (answers, its accuracy on train, on test)."""
    rng = np.random.default_rng(seed)
    if a.dataset == "fashion":
        x, y = fashion("train")
        xt, yt = fashion("test")
        te = sample(xt, yt, a.test_per_class, rng)
        test = (xt[te], yt[te], 100000 + te)
    else:
        x, y = digits()
        te = sample(x, y, a.test_per_class, rng)
        test = (x[te], y[te], te)
    fit = sample(x, y, a.teacher_fit, rng, exclude=te if a.dataset == "digits" else ())
    tr = sample(x, y, a.train_per_class, rng, exclude=np.concatenate([fit, te if a.dataset == "digits" else []]))
    write_folder(d / "data", {"train": (x[tr], y[tr], tr), "test": test})
    if a.teacher == "classifier":
        teacher = ClassifierTeacher(x[fit], y[fit], seed)
        ask = {"train": x[tr], "test": test[0]}
    else:  # its confusions measured on other held-out images; it answers from each image's true class
        held = sample(x, y, a.teacher_held, rng, exclude=np.concatenate([fit, tr, te if a.dataset == "digits" else []]))
        if len(held) < 10 * len(set(y)):
            raise SystemExit(f"error: only {len(held)} held-out images left for --teacher confusion; lower --train_per_class")
        teacher = ConfusionTeacher(x[fit], y[fit], x[held], y[held], seed)
        ask = {"train": y[tr], "test": test[1]}
    answers = dict(zip((f"{i:06d}.png" for i in tr), teacher.answer(ask["train"])))
    acc = float(np.mean([answers[f"{i:06d}.png"][0] == c for i, c in zip(tr, y[tr])]))
    on_test = teacher.answer(ask["test"])  # the cascade asks about test images too
    answers.update(zip((f"{i:06d}.png" for i in test[2]), on_test))
    return answers, acc, float(np.mean([t[0] == c for t, c in zip(on_test, test[1])]))


def answers_by_sha(run, answers):
    """make_data's answers keyed by image sha256, through the prepped run's manifest (what the loopback serves)."""
    from flywheel.io import read_csv
    return {m["sha256"]: answers[m["source_index"]] for m in read_csv(Path(run) / "manifest.csv")}


def answer_server(by_sha, **kw):
    """The loopback teacher (tests/loopback.py, on 127.0.0.1) answering each image with its fixed answer."""
    from loopback import LoopbackTeacher
    return LoopbackTeacher(by_sha, sorted({label for label, _ in by_sha.values()}), **kw)


def add_teacher_args(p):
    """The stand-in teacher's flags, for make_data."""
    p.add_argument("--teacher", choices=["classifier", "confusion"], default="classifier",
                   help="SIMULATED teacher: classifier (a pixel classifier's own answers: per-image errors a student "
                        "can learn) | confusion (that classifier's held-out confusion rates and confidences, drawn per "
                        "image: class-conditional errors) (default: classifier)")
    p.add_argument("--teacher_held", type=int, default=200,
                   help="--teacher confusion: held-out images per class its confusions are measured on (default: 200)")
    p.add_argument("--teacher_fit", type=int, default=12,
                   help="held-out images per class the stand-in teacher is fitted on (default: 12)")


def simulated_review(run, how, seed):
    """A SIMULATED person answers rows of a labeled run's review_labels.csv from the manifest's ground truth, as a
    person editing the file would (label_final, status approved; training reads them as source human). how:
    "reviewed" answers the review queue (every row that waits for a person, ledger.waits_for_person); "halfreviewed" the half of it with
    the lowest stated confidence (a person short of time); "audited", the control, answers as many rows as the queue
    holds, drawn at random from the whole sample, accepted ones included. -> how many rows it answered."""
    from flywheel.io import read_csv, write_csv
    from flywheel.ledger import APPROVED, waits_for_person
    run = Path(run)
    truth = {m["path"]: m["label"] for m in read_csv(run / "manifest.csv")}
    rows = read_csv(run / "review_labels.csv")
    queue = [i for i, r in enumerate(rows) if waits_for_person(r)]
    if how == "audited":
        pick = np.random.default_rng(seed).choice(len(rows), len(queue), replace=False)
    else:
        by_conf = sorted(queue, key=lambda i: float(rows[i].get("confidence") or 0))  # no stated confidence: first
        pick = by_conf if how == "reviewed" else by_conf[:len(queue) // 2]
    for i in pick:
        rows[i] = {**rows[i], "label_final": truth[rows[i]["path"]], "status": APPROVED}
    write_csv(run / "review_labels.csv", list(rows[0]), rows)
    return len(pick)

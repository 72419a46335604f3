"""Inputs unlike the training images, which a student still answers, often with full confidence: a
degenerate size, or an image far from every training image. Export fits it from the promoted student's
training and validation images (artifacts/ood.npz); serving sends such an upload to a person, with the
reason, and never to the LLM.

"Far" is measured twice, and either is enough: on the student's own features (the exported graph's second
output, the input of its last layer, unit-normalised: what the student reads, at no extra compute per upload),
which catch another kind of image in the same look (digits for a clothing student); and on raw 12x12
thumbnails (flywheel.quality), which catch gross mismatches the features map onto a class (colour blocks,
noise, a blank). bench/ood_bench.py measured each alone and both. Each threshold is a quantile of held-out
validation images' distances (UNION_QUANTILE each, so at most about 1% of genuine images go to a person).
"""
import logging
from typing import NamedTuple

import numpy as np

log = logging.getLogger(__name__)

MIN_SIDE = 8          # px: a smaller upload carries too little for the student to read
MAX_ASPECT = 6.0      # longer side / shorter side: a banner or a strip, not a photo of one object
OOD_QUANTILE = 0.99   # of validation images' distances to the training bank: the threshold of one check
UNION_QUANTILE = 0.995  # each of the two checks' when both run: their union sends <= ~1% of genuine images away
MAX_BANK = 5000       # training thumbnails kept (432 bytes each); distance is one pass over them per upload


def size_problem(width, height):
    """Why an image of this size cannot be judged, or None.

    >>> size_problem(1, 1), size_problem(640, 60), size_problem(32, 32)
    ('degenerate size 1x1 px (under 8 px on a side)', 'degenerate size 640x60 px (aspect ratio 10.7 over 6)', None)
    """
    if min(width, height) < MIN_SIDE:
        return f"degenerate size {width}x{height} px (under {MIN_SIDE} px on a side)"
    aspect = max(width, height) / min(width, height)
    if aspect > MAX_ASPECT:
        return f"degenerate size {width}x{height} px (aspect ratio {aspect:.1f} over {MAX_ASPECT:g})"
    return None


def nearest_distance(x, bank):
    """Root-mean-square difference in grey levels to the nearest bank row. x uint8/float [n, D], bank [m, D]
    -> float [n].

    A pixel pair (0, 0) against rows (0, 3) and (4, 4): the nearest is (0, 3), sqrt((0 + 9) / 2) = 2.121.
    >>> [round(float(d), 3) for d in nearest_distance([[0, 0]], [[0, 3], [4, 4]])]
    [2.121]
    """
    x, bank = np.asarray(x, np.float32), np.asarray(bank, np.float32)
    # |x - b|^2 = |x|^2 - 2 x.b + |b|^2, over the bank at once: [n, m]
    d2 = (x * x).sum(1)[:, None] - 2 * x @ bank.T + (bank * bank).sum(1)[None, :]
    return np.sqrt(np.maximum(d2.min(1), 0.0) / x.shape[1])


class OODModel(NamedTuple):
    bank: np.ndarray       # uint8 [m, D] training thumbnails (pixels), or float16 [m, D] unit features
    threshold: float       # a distance above it is out of distribution (grey levels, or RMS of unit features)
    val_quantile: float    # the quantile of validation distances the threshold is
    kind: str = "pixels"   # pixels | features
    also: object = None    # a second OODModel asked when this one finds nothing (features, then pixels)

    def distance(self, img, features=None):
        """The distance of one upload (a PIL image; its student features [D] for kind features) to the bank."""
        if self.kind == "features":
            return 0.0 if features is None else float(nearest_distance(unit(features)[None], self.bank)[0])
        from flywheel.quality import thumbnail
        return float(nearest_distance(thumbnail(img)[None], self.bank)[0])

    def reason(self, img, features=None):
        """Why a PIL image is unlike training (degenerate size, or far from every training image), or None."""
        why = size_problem(*img.size)
        if why:
            return why
        d = self.distance(img, features)
        if d > self.threshold:
            what = "feature distance" if self.kind == "features" else "pixel distance"
            return (f"unlike every training image: {what} {d:.3g} to the nearest one, over {self.threshold:.3g} "
                    f"(the {100 * self.val_quantile:g}th percentile of validation images)")
        return self.also.reason(img, features) if self.also is not None else None

    def save(self, path):
        from flywheel.io import atomic_write_bytes
        import io
        buf = io.BytesIO()
        arrays, m, pre = {}, self, ""
        while m is not None:  # the chain, one key prefix per link
            arrays.update({pre + "bank": m.bank, pre + "threshold": m.threshold, pre + "val_quantile": m.val_quantile,
                           pre + "kind": m.kind})
            m, pre = m.also, pre + "also_"
        np.savez_compressed(buf, **arrays)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path, _z=None, pre=""):
        z = np.load(path) if _z is None else _z
        if pre + "bank" not in z:
            return None
        kind = str(z[pre + "kind"]) if pre + "kind" in z else "pixels"  # an export from before the features check
        bank = z[pre + "bank"].astype(np.float32) if kind == "features" else z[pre + "bank"]  # widened once
        return cls(bank, float(z[pre + "threshold"]), float(z[pre + "val_quantile"]), kind,
                   cls.load(path, z, pre + "also_"))


def unit(x):
    """Rows scaled to unit length (a zero row stays zero).

    >>> [[round(float(v), 3) for v in row] for row in unit(np.array([[3.0, 4.0], [0.0, 0.0]]))]
    [[0.6, 0.8], [0.0, 0.0]]
    """
    x = np.asarray(x, np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def session_features(session, files, batch=64):
    """float32 [n, D]: the exported graph's features output for image files (prep's, all one size)."""
    from flywheel.export import load_images
    out = [session.run(["features"], {"image": load_images(files[i:i + batch])})[0] for i in range(0, len(files), batch)]
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def fit_ood_both(session, train_files, val_files, seed=0) -> OODModel:
    """The serving check: the student's features, then pixels, each at UNION_QUANTILE of validation."""
    return fit_ood_features(session, train_files, val_files, seed, UNION_QUANTILE)._replace(
        also=fit_ood(train_files, val_files, seed, UNION_QUANTILE))


def fit_ood_features(session, train_files, val_files, seed=0, q=OOD_QUANTILE) -> OODModel:
    """As fit_ood, on the student's unit-normalised features (the session's "features" output)."""
    rng = np.random.default_rng(seed)
    keep = sorted(rng.permutation(len(train_files))[:MAX_BANK].tolist())
    bank = unit(session_features(session, [train_files[i] for i in keep])).astype(np.float16)
    val = unit(session_features(session, val_files))
    d = nearest_distance(val, bank) if len(val) else np.zeros(1)
    m = OODModel(bank, float(np.quantile(d, q)), q, "features")
    log.info("ood: serving sends an upload to a person when it is under %d px, or further than %.3g (RMS of unit "
             "student features) from all %d training images (the %gth percentile of validation)", MIN_SIDE,
             m.threshold, len(m.bank), 100 * m.val_quantile)
    return m


def fit_ood(train_files, val_files, seed=0, q=OOD_QUANTILE) -> OODModel:
    """The bank (at most MAX_BANK training thumbnails, drawn with seed) and the threshold: the q-quantile
    of the validation images' distances to it (images the bank has not seen, as uploads are)."""
    from flywheel.quality import pixel_features
    rng = np.random.default_rng(seed)
    keep = sorted(rng.permutation(len(train_files))[:MAX_BANK].tolist())
    bank = pixel_features([train_files[i] for i in keep], desc="ood: training thumbnails")
    val = pixel_features(val_files, desc="ood: validation thumbnails")
    d = nearest_distance(val, bank) if len(val) else np.zeros(1)
    m = OODModel(bank, float(np.quantile(d, q)), q)
    log.info("ood: serving sends an upload to a person when it is under %d px, or further than %.1f grey levels "
             "from all %d training thumbnails (the %gth percentile of validation)", MIN_SIDE, m.threshold,
             len(m.bank), 100 * m.val_quantile)
    return m

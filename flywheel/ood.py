"""Inputs unlike the training images, which a student still answers, often with full confidence: a
degenerate size, or pixel features (flywheel.quality's 12x12 thumbnail) far from every training image.
Export fits it from the promoted student's training and validation images (artifacts/ood.npz); serving
sends such an upload to a person, with the reason, and never to the LLM.

Shortcut: the distance is over raw thumbnails, so it catches gross mismatches (a blank, a screenshot, a
scene of another kind, other colours), not a photo of an unseen class that looks like a seen one. The
threshold is a quantile of held-out validation images' distances, so about 1 - OOD_QUANTILE of genuine
images go to a person too.
"""
import logging
from typing import NamedTuple

import numpy as np

log = logging.getLogger(__name__)

MIN_SIDE = 8          # px: a smaller upload carries too little for the student to read
MAX_ASPECT = 6.0      # longer side / shorter side: a banner or a strip, not a photo of one object
OOD_QUANTILE = 0.99   # of validation images' distances to the training bank: the threshold
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
    bank: np.ndarray       # uint8 [m, D] training thumbnails
    threshold: float       # grey levels: a distance above it is out of distribution
    val_quantile: float    # the quantile of validation distances the threshold is

    def reason(self, img):
        """Why a PIL image is unlike training (degenerate size, or far from every training image), or None."""
        from flywheel.quality import thumbnail
        why = size_problem(*img.size)
        if why:
            return why
        d = float(nearest_distance(thumbnail(img)[None], self.bank)[0])
        if d > self.threshold:
            return (f"unlike every training image: pixel distance {d:.1f} grey levels to the nearest one, over "
                    f"{self.threshold:.1f} (the {100 * self.val_quantile:g}th percentile of validation images)")
        return None

    def save(self, path):
        from flywheel.io import atomic_write_bytes
        import io
        buf = io.BytesIO()
        np.savez_compressed(buf, bank=self.bank, threshold=self.threshold, val_quantile=self.val_quantile)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path):
        z = np.load(path)
        return cls(z["bank"], float(z["threshold"]), float(z["val_quantile"]))


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

"""A run's images as the student reads them (the memory-mapped cache, one batch at a time) and the
student's calibrated probabilities on them: what eval, the cascade and training share."""
import time
from typing import NamedTuple

import numpy as np

from flywheel.calibrate import softmax
from flywheel.imcache import ImageCache
from flywheel.io import read_csv
from flywheel.student import decode_images, model_from_checkpoint, predict_logits


class Predictions(NamedTuple):
    probs: np.ndarray     # [N, C] calibrated probabilities
    logits: np.ndarray    # [N, C] uncalibrated logits
    ms_per_image: float   # mean student time per image (batched, on the device used)
    images: object        # the lazy uint8 [N, 3, H, W] view they were computed from


def image_cache(P) -> ImageCache:
    """The run's memory-mapped image cache (flywheel.imcache), built or finished on first use."""
    return ImageCache(P.out, read_csv(P.need(P.manifest, "prep")))


def images_of(P, rows, desc="decode"):
    """A lazy uint8 [N, 3, H, W] view of rows' images: manifest images come from the cache in chunks as
    they are used; production uploads (not in the manifest) are decoded into memory."""
    return image_cache(P).view([r["path"] for r in rows],
                               extra=lambda paths: decode_images([P.out / p for p in paths], desc=desc))


def load_split(P, rows, classes, desc):
    """(lazy uint8 images [N, 3, H, W], int64 class indices [N]) of rows {path, label}."""
    y = np.array([classes.index(r["label"]) for r in rows], dtype=np.int64)
    return images_of(P, rows, desc), y


def student_probs(P, rows, best, device, desc) -> Predictions:
    """The student's calibrated probabilities on rows' images, batched on `device`, reading the image
    cache one batch at a time."""
    x = images_of(P, rows, desc)
    model = model_from_checkpoint(best, device)
    t0 = time.perf_counter()
    logits = predict_logits(model, x, device, best["config"]["batch_size"], desc=desc)
    ms = (time.perf_counter() - t0) * 1000 / max(len(rows), 1)
    return Predictions(softmax(logits, best["temperature"]), logits, ms, x)

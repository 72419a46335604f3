"""A run's images as the student reads them (the memory-mapped cache, one batch at a time) and the
student's calibrated probabilities on them: what eval, the cascade and training share."""
import functools
import time
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from flywheel.calibrate import softmax
from flywheel.imcache import ImageCache
from flywheel.io import read_csv
from flywheel.student import decode_images, decode_jpeg, features, lite0, model_from_checkpoint, normalize, predict_logits

EMBED_SIZE = 96       # px: images are resized to this side before the backbone embeds them
EMBED_BATCH = 64
EMBED_DIM = 1280      # Lite0's pooled features


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


@functools.lru_cache(maxsize=1)
def _embedder():
    return lite0(imagenet=True).eval()


def embed_files(files, size=EMBED_SIZE, batch=EMBED_BATCH, desc="held-out model: embeddings") -> np.ndarray:
    """float16 [N, EMBED_DIM]: the ImageNet-pretrained EfficientNet-Lite0 backbone's pooled features of each
    image (resized to size x size), installed with the package: no network. float16 and filled in place, so a
    million images hold 2.6 GB, not 5.1 GB twice over (a list of float32 batches, then their concatenation);
    the pooled features lie in [0, 6] (ReLU6), where float16 keeps 3 significant digits."""
    model, files = _embedder(), list(files)
    out = np.empty((len(files), EMBED_DIM), np.float16)
    for s in tqdm(range(0, len(files), batch), desc=desc, unit="batch", leave=False):
        x = torch.stack([decode_jpeg(f) for f in files[s:s + batch]]).float()
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        with torch.no_grad():
            out[s:s + batch] = features(model, normalize(x)).numpy()
    return out

"""A memory-mapped uint8 image cache: the run's prepped images decoded once, read by every step in chunks.

OUT/cache/images_<H>x<W>.u8 holds uint8 [N, 3, H, W] for the manifest's rows in manifest order (prep
makes every image the same size). Beside it, .done is one byte per row (1 = decoded) and .json names
the rows (a hash of every path and sha256) and the shape. Building decodes the missing rows in chunks
across threads (Pillow releases the GIL while decoding), flushes each chunk's pixels before marking it
done, and shows a tqdm bar, so an interrupted build resumes where it stopped. A manifest that changed
(prep rerun) starts a new cache.

Memory: the cache's pages are file-backed, so the kernel can drop and reread them; a step's heap holds
only the batch it is working on. 60,000 images at 96px are 1.66 GB on disk and in the page cache, and
nothing in anonymous memory.
"""
import fcntl
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

log = logging.getLogger(__name__)

CACHE_VERSION = 1
BUILD_CHUNK = 1024  # images decoded, flushed and marked done together (~28 MB at 96px)


def rows_key(rows) -> str:
    """A content id for the rows a cache holds, from their paths and sha256s in order.

    >>> rows_key([{"path": "a.jpg", "sha256": "01"}]) == rows_key([{"path": "a.jpg", "sha256": "01"}])
    True
    >>> rows_key([{"path": "a.jpg", "sha256": "01"}]) == rows_key([{"path": "a.jpg", "sha256": "02"}])
    False
    """
    h = hashlib.sha256()
    for r in rows:
        h.update(f"{r['path']}\t{r['sha256']}\n".encode())
    return h.hexdigest()


def _decode_hwc(path) -> np.ndarray:
    """One image file -> uint8 [H, W, 3] RGB, decoded as training decodes it (flywheel.student.decode_rgb)."""
    from flywheel.student import decode_rgb
    return decode_rgb(path)


class ImageCache:
    """The cache of one run folder: `x` is the read-only memmap [N, 3, H, W], `index` maps path -> row."""

    def __init__(self, out_dir, rows, workers=None, chunk=BUILD_CHUNK, desc="image cache"):
        out_dir = Path(out_dir)
        self.rows = list(rows)
        self.index = {r["path"]: i for i, r in enumerate(self.rows)}
        if not self.rows:
            raise ValueError("no images to cache; rerun --step prep")
        h, w, _ = _decode_hwc(out_dir / self.rows[0]["path"]).shape
        self.shape = (len(self.rows), 3, h, w)
        base = out_dir / "cache" / f"images_{h}x{w}"
        self.data_path, self.done_path, self.meta_path = (base.with_suffix(s) for s in (".u8", ".done", ".json"))
        base.parent.mkdir(parents=True, exist_ok=True)
        with open(base.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; a second process waits, then finds it done
            self._build(out_dir, workers or min(8, os.cpu_count() or 1), chunk, desc)
        self.x = np.memmap(self.data_path, np.uint8, "r", shape=self.shape)

    def _build(self, out_dir, workers, chunk, desc):
        meta = {"version": CACHE_VERSION, "shape": list(self.shape), "rows": rows_key(self.rows)}
        fresh = True
        if self.meta_path.exists() and self.data_path.exists() and self.done_path.exists():
            try:
                old = json.loads(self.meta_path.read_text())
            except ValueError:
                old = None
            fresh = old != meta
            if fresh:
                log.info("image cache %s describes other images (prep was rerun): rebuilding it", self.data_path)
        if fresh:
            for p in self.data_path.parent.glob("images_*"):  # this size's old files, and other sizes' (prep reran)
                if p.suffix in (".u8", ".done", ".json"):
                    p.unlink(missing_ok=True)
            # the data file first, sized to hold every row (sparse until written), then the flags, then the meta
            with open(self.data_path, "wb") as f:
                f.truncate(int(np.prod(self.shape)))
            with open(self.done_path, "wb") as f:
                f.truncate(self.shape[0])
            tmp = self.meta_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(meta))
            os.replace(tmp, self.meta_path)
        done = np.memmap(self.done_path, np.uint8, "r+", shape=(self.shape[0],))
        todo = np.flatnonzero(done == 0)
        if len(todo) == 0:
            return
        data = np.memmap(self.data_path, np.uint8, "r+", shape=self.shape)
        n, h, w = self.shape[0], self.shape[2], self.shape[3]

        def put(i):
            a = _decode_hwc(out_dir / self.rows[i]["path"])
            if a.shape != (h, w, 3):
                raise ValueError(f"{self.rows[i]['path']} is {a.shape[1]}x{a.shape[0]}, the others {w}x{h}; "
                                 f"rerun --step prep so every image has the same size")
            data[i] = a.transpose(2, 0, 1)

        log.info("image cache: decoding %d of %d images (%dx%d) into %s", len(todo), n, w, h, self.data_path)
        with ThreadPoolExecutor(workers) as ex, tqdm(total=len(todo), desc="decode to image cache", unit="img") as bar:
            for s in range(0, len(todo), chunk):
                part = todo[s:s + chunk]
                for _ in ex.map(put, part):
                    bar.update(1)
                data.flush()        # the pixels reach the file before the flags say they are there
                done[part] = 1
                done.flush()
        data = done = None  # drop the memory maps, which closes their files

    def view(self, paths, extra=None) -> "Images":
        """An Images view of these paths, in order. Paths outside the manifest (production uploads) are
        decoded into memory: they are few."""
        idx = np.array([self.index.get(p, -1) for p in paths], np.int64)
        missing = [p for p, i in zip(paths, idx) if i < 0]
        if missing and extra is None:
            raise KeyError(f"{len(missing)} path(s) are not in the manifest's image cache, e.g. {missing[0]}")
        if missing:
            ext = extra(missing)  # uint8 [M, 3, H, W]
            idx[idx < 0] = -1 - np.arange(len(missing))
            return Images(self.x, idx, ext)
        return Images(self.x, idx)


class Images:
    """A lazy uint8 [N, 3, H, W] image set: row i is cache row idx[i] (or extra[-1 - idx[i]] when
    negative). Indexing with an int, a slice, a list, an array or a LongTensor returns a torch uint8
    tensor holding just those images, so training batches and inference chunks never load the rest.

    >>> x = np.arange(4 * 3 * 2 * 2, dtype=np.uint8).reshape(4, 3, 2, 2)
    >>> v = Images(x, np.array([2, 0, -1]), torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    >>> len(v), v.shape, v[0:2][:, 0, 0, 0].tolist(), v[[2]][0, 0, 0, 0].item()
    (3, (3, 3, 2, 2), [24, 0], 255)
    >>> v.take([1])[0:1][0, 0, 0, 0].item()
    0
    """

    def __init__(self, x, idx, extra=None):
        self.x, self.idx, self.extra = x, np.asarray(idx, np.int64), extra

    def __len__(self):
        return len(self.idx)

    @property
    def shape(self):
        return (len(self.idx), *self.x.shape[1:])

    def take(self, sel) -> "Images":
        """A sub-view (no pixels read)."""
        return Images(self.x, self.idx[np.asarray(sel, np.int64)], self.extra)

    def __getitem__(self, sel) -> torch.Tensor:
        if isinstance(sel, torch.Tensor):
            sel = sel.numpy()
        rows = self.idx[sel]
        if np.ndim(rows) == 0:
            return self[[int(sel)]][0]
        out = np.empty((len(rows), *self.x.shape[1:]), np.uint8)
        mine = rows >= 0
        if mine.any():
            r = rows[mine]
            order = np.argsort(r, kind="stable")  # read the file in order; put each image back in its place
            out[np.flatnonzero(mine)[order]] = self.x[r[order]]
        if not mine.all():
            out[~mine] = self.extra[torch.as_tensor(-1 - rows[~mine])].numpy()
        return torch.from_numpy(out)

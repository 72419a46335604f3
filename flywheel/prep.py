"""The prep step's machinery: which classes a run has, the images it makes (one PrepJob per source
image, square JPEGs at --img_size made in threads), and the training images kept out because their bytes
are a test image's. The data sources themselves (CIFAR-100 archive, image folders) live in data.py.
"""
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from flywheel import FlywheelError, cli
from flywheel.data import (DataError, cifar100_fine_names, cifar100_location, ensure_cifar100, folder_image_name,
                           jpeg_bytes, list_folder_dataset, load_cifar100_split, upscale)
from flywheel.io import atomic_write_bytes, read_json, sha256_file

log = logging.getLogger(__name__)

CIFAR5 = "apple,mushroom,orange,pear,sweet_pepper"
CIFAR100_FINE = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel "
    "can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur "
    "dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion "
    "lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree "
    "pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea "
    "seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table "
    "tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman "
    "worm").split()
JPEG_QUALITY = 90  # of every image prep writes; prep.json records it
MIN_CLASS_IMAGES = 10
PREP_CHUNK = 4096  # images queued to the prep threads at once
MANIFEST_FIELDS = ["path", "split", "label", "source_index", "sha256"]


class ClassesError(FlywheelError):
    """--classes that the data source does not have; the message names the closest one."""


def resolve_classes(classes_flag, dataset, data_root, run_classes):
    """The class list, checked against the data source before any work. run_classes: the run's
    classes.json, used when the image folder is gone but prep already ran."""
    given = [c.strip() for c in classes_flag.split(",") if c.strip()] if classes_flag else None
    if given is not None and len(set(given)) != len(given):
        raise ClassesError(f"--classes has duplicates: {classes_flag!r}")
    if given is not None and len(given) < 2:
        raise ClassesError(f"--classes needs at least 2 classes, got {given}")
    if dataset == "cifar100":
        classes = given or CIFAR5.split(",")
        # the 100 fine names: from the archive when it is there, else the built-in list
        folder, _ = cifar100_location(data_root)
        names = cifar100_fine_names(folder) if (folder / "meta").exists() else CIFAR100_FINE
        unknown = [c for c in classes if c not in names]
        if unknown:
            raise ClassesError(f"--classes: {unknown[0]!r} is not a CIFAR-100 class"
                               + (cli.did_you_mean(unknown[0], names) if cli.closest(unknown[0], names) else
                                  f"; the 100 fine names start {', '.join(names[:8])}, ..."))
        return classes
    if not Path(data_root).is_dir() and Path(run_classes).exists():
        found = read_json(run_classes)  # data folder gone, but prep already ran: later steps still work
    else:
        try:
            found = sorted(list_folder_dataset(data_root)["train"])
        except DataError as e:
            raise DataError(f"--data_root: {e}") from None
    classes = given or found
    unknown = [c for c in classes if c not in found]
    if unknown:
        raise ClassesError(f"--classes: {unknown[0]!r} has no folder under {data_root}/train/"
                           + cli.did_you_mean(unknown[0], found))
    return classes


class PrepJob(NamedTuple):
    split: str
    cls: str
    name: str            # output file name under images/<split>/<class>/
    source_index: object  # CIFAR: index in the official split array; folder: the source file name
    load: Callable        # () -> PIL image
    source: str           # for error messages


class Made(NamedTuple):
    """What prep made of its jobs: manifest rows, unreadable files, and counts."""
    rows: list            # {path, split, label, source_index, sha256}
    skipped: list         # [{file, error}]
    made: int             # images written this run
    kept: int             # images already there with these settings


def prep_jobs(dataset, data_root, classes, cap=None) -> list:
    """One PrepJob per source image of the classes, train and test, at most cap per class and split."""
    jobs = []
    if dataset == "cifar100":
        folder = ensure_cifar100(data_root)
        for split in ("train", "test"):
            imgs, labels, names = load_cifar100_split(folder, split)
            for c in classes:
                idx = np.flatnonzero(labels == names.index(c))[:cap]
                jobs += [PrepJob(split, c, f"{c}_{i:05d}.jpg", int(i), (lambda a=imgs[i]: Image.fromarray(a)),
                                 f"{split}[{i}]") for i in idx]
        return jobs
    tree = list_folder_dataset(data_root)
    for split in ("train", "test"):
        for c in classes:
            files = tree[split].get(c, [])
            if split == "train" and len(files) < MIN_CLASS_IMAGES:
                log.warning("class %r has only %d training image(s) in %s; the student and its validation "
                            "need more (at least %d)", c, len(files), Path(data_root) / split / c, MIN_CLASS_IMAGES)
            # the output name comes from the file's own name, so adding a file renames nothing
            jobs += [PrepJob(split, c, folder_image_name(f.name), f.name, (lambda f=f: open_image(f)), str(f))
                     for f in files[:cap]]
    return jobs


def make_images(out, jobs, size, sharpen) -> Made:
    """Each job's square JPEG under out/images/<split>/<class>/ (an existing one is kept), in threads:
    Pillow releases the GIL while it decodes, resizes and encodes. Unreadable files are listed, never fatal."""
    def make(job):
        rel = Path("images") / job.split / job.cls / job.name
        dst = Path(out) / rel
        if dst.exists():
            return job, rel, "kept", sha256_file(dst)
        try:
            img = job.load()
        except Exception as e:
            return job, rel, f"{type(e).__name__}: {e}", None
        atomic_write_bytes(dst, jpeg_bytes(upscale(img, size, sharpen), JPEG_QUALITY))
        return job, rel, "made", sha256_file(dst)

    m = Made([], [], 0, 0)
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as ex, tqdm(total=len(jobs), desc="prep images", unit="img") as bar:
        for s in range(0, len(jobs), PREP_CHUNK):  # a chunk at a time: a million jobs are never all queued
            for job, rel, what, sha in ex.map(make, jobs[s:s + PREP_CHUNK]):
                bar.update(1)
                if sha is None:
                    m.skipped.append({"file": job.source, "error": what})
                    continue
                m = m._replace(made=m.made + (what == "made"), kept=m.kept + (what == "kept"))
                m.rows.append({"path": rel.as_posix(), "split": job.split, "label": job.cls,
                               "source_index": job.source_index, "sha256": sha})
    return m


def class_counts(rows, classes) -> dict:
    """{split: {class: images}}.

    >>> class_counts([{"split": "train", "label": "a"}, {"split": "test", "label": "b"}], ["a", "b"])
    {'train': {'a': 1, 'b': 0}, 'test': {'a': 0, 'b': 1}}
    """
    return {s: {c: sum(r["split"] == s and r["label"] == c for r in rows) for c in classes} for s in ("train", "test")}


def drop_cross_split_duplicates(rows):
    """-> (rows without training images whose bytes also appear in the test split, [{train, test}]).
    A test image seen in training would inflate every test figure.

    >>> rows = [{"path": "a", "split": "train", "sha256": "1"}, {"path": "b", "split": "test", "sha256": "1"},
    ...         {"path": "c", "split": "train", "sha256": "2"}]
    >>> kept, dups = drop_cross_split_duplicates(rows)
    >>> [r["path"] for r in kept], dups
    (['b', 'c'], [{'train': 'a', 'test': 'b'}])
    """
    test = {}
    for r in rows:
        if r["split"] == "test":
            test.setdefault(r["sha256"], r["path"])
    dups = [{"train": r["path"], "test": test[r["sha256"]]} for r in rows
            if r["split"] == "train" and r["sha256"] in test]
    drop = {d["train"] for d in dups}
    return [r for r in rows if r["path"] not in drop], dups


def open_image(f):
    with Image.open(f) as im:
        im.load()
        return im.convert("RGB")


def listing(items, n=5) -> str:
    """The first n items, comma-separated, with " ..." when there are more.

    >>> listing(["a", "b", "c"], 2), listing(["a"])
    ('a, b ...', 'a')
    """
    items = list(items)
    return ", ".join(items[:n]) + (" ..." if len(items) > n else "")

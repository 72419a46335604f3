"""Local stand-ins for what this machine cannot reach: a CIFAR-100 archive written the way Python 2
wrote it, colour-coded so that a swapped channel order or label mapping is visible, and a synthetic
image folder."""
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

import cifar_distill
from flywheel import prep
from loopback import LOOKALIKES

CIFAR5 = prep.CIFAR5.split(",")
KEY = "sk-or-test-SECRET-4242"  # the test API key: no file under a run folder may ever contain it
# one pure-ish colour per class; channel-distinct so that an RGB/BGR swap changes the class colour
COLOURS = {"apple": (220, 30, 30), "mushroom": (30, 200, 40), "orange": (30, 40, 210),
           "pear": (220, 210, 30), "sweet_pepper": (200, 30, 210), "bear": (120, 120, 120)}


# --- a minimal Python-2 pickler (protocol 2): str is a py2 byte string, as in the real archive
def _pstr(b: bytes) -> bytes:
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<I", len(b)) + b)


def _pint(i: int) -> bytes:
    return (b"K" + bytes([i])) if 0 <= i < 256 else (b"J" + struct.pack("<i", i))


def _plist_str(items) -> bytes:
    return b"](" + b"".join(_pstr(s) for s in items) + b"e"


def _plist_int(items) -> bytes:
    return b"](" + b"".join(_pint(int(i)) for i in items) + b"e"


def _pndarray_u8(a: np.ndarray) -> bytes:
    """ndarray exactly as numpy under Python 2 pickled it (numpy.core.multiarray._reconstruct)."""
    a = np.ascontiguousarray(a, dtype=np.uint8)
    shape = b"(" + b"".join(_pint(s) for s in a.shape) + b"t"
    dtype = (b"cnumpy\ndtype\n" + _pstr(b"u1") + _pint(0) + _pint(1) + b"\x87R"
             + b"(" + _pint(3) + _pstr(b"|") + b"NNN" + _pint(-1) + _pint(-1) + _pint(0) + b"tb")
    return (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + _pint(0) + b"\x85"
            + _pstr(b"b") + b"\x87R" + b"(" + _pint(1) + shape + dtype + b"\x89"
            + b"T" + struct.pack("<I", a.nbytes) + a.tobytes() + b"tb")


def py2_pickle(d: dict) -> bytes:
    body = b""
    for k, v in d.items():
        if isinstance(v, np.ndarray):
            val = _pndarray_u8(v)
        elif v and isinstance(v[0], bytes):
            val = _plist_str(v)
        else:
            val = _plist_int(v)
        body += _pstr(k.encode()) + val
    return b"\x80\x02}(" + body + b"u."


def make_cifar_folder(root: Path, n_train=6, n_test=3, classes=("apple", "mushroom", "orange", "pear",
                                                                 "sweet_pepper", "bear"), seed=0, mix=0.0, lookalike_mix=0.0):
    """root/cifar-100-python/{train,test,meta}; each image is its class colour plus small noise.

    Classes interleave in the arrays (as in the real set), so a label-mapping error moves colours.
    mix > 0 blends each image with a random other class's colour (weight uniform in [0, mix]), so a
    student is unsure of some images: what the cascade and flywheel tests need. lookalike_mix > 0 blends
    each image toward its class's look-alike (loopback.LOOKALIKES; weight uniform in [0, lookalike_mix]),
    so above 0.5 an image looks more like the look-alike than its own class, as real ambiguous images do."""
    rng = np.random.default_rng(seed)
    names = prep.CIFAR100_FINE
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = [names.index(c) for _ in range(n) for c in classes]
        data = np.zeros((len(labels), 3072), np.uint8)
        for j, lab in enumerate(labels):
            rgb = np.array(COLOURS[names[lab]], np.float64)
            if mix:
                other = COLOURS[classes[rng.integers(len(classes))]]
                a = rng.uniform(0, mix)
                rgb = (1 - a) * rgb + a * np.array(other, np.float64)
            if lookalike_mix and names[lab] in LOOKALIKES:
                a = rng.uniform(0, lookalike_mix)
                rgb = (1 - a) * rgb + a * np.array(COLOURS[LOOKALIKES[names[lab]]], np.float64)
            rgb = rgb.astype(np.int16)
            hwc = np.clip(rgb + rng.integers(-8, 9, (32, 32, 3)), 0, 255).astype(np.uint8)
            data[j] = hwc.transpose(2, 0, 1).reshape(-1)  # R plane, G plane, B plane
        (folder / split).write_bytes(py2_pickle({"filenames": [f"x{j}.png".encode() for j in range(len(labels))],
                                                 "fine_labels": labels, "coarse_labels": [0] * len(labels),
                                                 "data": data}))
        truth[split] = labels
    (folder / "meta").write_bytes(py2_pickle({"fine_label_names": [n.encode() for n in names],
                                              "coarse_label_names": [b"c%d" % i for i in range(20)]}))
    return folder, truth


def make_cifar_tgz(root: Path, **kw) -> Path:
    src = Path(root) / "_src"
    folder, _ = make_cifar_folder(src, **kw)
    tgz = Path(root) / "cifar-100-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(folder, arcname="cifar-100-python")
    import shutil
    shutil.rmtree(src)
    return tgz


def make_image_folder(root: Path, classes=("red", "green", "blue"), n_train=4, n_test=2, size=20):
    cols = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}
    for split, n in (("train", n_train), ("test", n_test)):
        for c in classes:
            d = Path(root) / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                fmt = "PNG" if i % 2 else "JPEG"
                im = Image.new("RGB", (size, size + i), cols[c])
                im.putpixel((0, 0), (i, 100 if split == "train" else 200, 0))  # no train image equals a test image
                im.save(d / f"{c}{i}.{fmt.lower()}", format=fmt)
    return Path(root)


def mean_rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), np.float32).reshape(-1, 3).mean(0)


def run_cli(*args):
    """Run the real CLI in-process; returns None or raises SystemExit like the script would."""
    return cifar_distill.main([str(a) for a in args])


def truth_by_sha(run) -> dict:
    """{image sha256: ground-truth label} from a run's manifest: what the loopback teacher answers from."""
    from flywheel.io import read_csv
    return {r["sha256"]: r["label"] for r in read_csv(Path(run) / "manifest.csv")}


def ledger_records(run, name="labels.jsonl") -> list:
    """labels.jsonl (or another ledger file in the run) through the project's torn-line-tolerant reader
    (tests poll it while a child appends)."""
    from flywheel.io import read_jsonl
    return read_jsonl(Path(run) / name)[0]


def solid_jpeg_items(root, n, offset=0, classes=("apple", "pear")):
    """n distinct solid-colour JPEGs under root -> ([{path, file, sha256}], {sha256: label}) for label_items."""
    import hashlib
    from PIL import Image
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    items, truth = [], {}
    for i in range(offset, offset + n):
        f = root / f"{i}.jpg"
        Image.new("RGB", (8, 8), (i * 37 % 256, i * 91 % 256, 90)).save(f, format="JPEG")
        sha = hashlib.sha256(f.read_bytes()).hexdigest()
        items.append({"path": f"images/train/x/{i}.jpg", "file": str(f), "sha256": sha})
        truth[sha] = classes[i % len(classes)]
    return items, truth

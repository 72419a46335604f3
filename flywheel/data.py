"""Data sources for the prep step: the official CIFAR-100 python archive and plain image folders.

CIFAR-100 (python version) is a tar.gz holding cifar-100-python/{train,test,meta}, each a pickle
written by Python 2: dicts with *bytes* keys (b"data", b"fine_labels", b"fine_label_names").
`data` is an N x 3072 uint8 array: 1024 R values, then 1024 G, then 1024 B, row-major 32 x 32.
Shortcut taken: the MD5 is checked on download only; an extracted folder is trusted as it is.
"""
from flywheel import FlywheelError
import io
import logging
import pickle
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

log = logging.getLogger(__name__)

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_DIR = "cifar-100-python"
CIFAR100_TGZ = "cifar-100-python.tar.gz"
DOWNLOAD_TIMEOUT_S = 60.0


class DataError(FlywheelError):
    """A data problem the user must fix; the message names it and the fix."""


# ----------------------------------------------------------------------------- archive

def md5_file(path) -> str:
    from flywheel.io import hash_file
    return hash_file(path, "md5")


def download_cifar100(dest: Path, url: str = CIFAR100_URL, md5: str = CIFAR100_MD5):
    """Stream `url` to dest.part with a tqdm bar, check the MD5, then rename to dest."""
    import httpx
    from tqdm import tqdm
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with httpx.stream("GET", url, follow_redirects=True, timeout=DOWNLOAD_TIMEOUT_S) as r:
            r.raise_for_status()
            total = int(r.headers.get("content-length", 0)) or None
            with open(part, "wb") as f, tqdm(total=total, unit="B", unit_scale=True,
                                             desc="download CIFAR-100") as bar:
                for chunk in r.iter_bytes(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (httpx.HTTPError, OSError) as e:
        part.unlink(missing_ok=True)
        raise DataError(
            f"download of {url} failed ({type(e).__name__}: {e}). With no network, fetch the archive "
            f"elsewhere and place it at {dest} (or its extracted folder at {dest.parent / CIFAR100_DIR}), "
            f"then rerun.") from e
    got = md5_file(part)
    if got != md5:
        part.unlink(missing_ok=True)
        raise DataError(f"download of {url} has MD5 {got}, expected {md5}; the file was discarded. Rerun "
                        f"to try again, or place a good copy at {dest}.")
    part.replace(dest)
    log.info("downloaded %s -> %s (MD5 ok)", url, dest)


def safe_extract(tgz: Path, into: Path):
    """Extract tgz under `into` via a temp folder, refusing any member that would escape it.

    Nothing appears at its final place unless the whole archive extracted cleanly.
    """
    tgz, into = Path(tgz), Path(into)
    into.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=into, prefix=".extract."))
    try:
        try:
            with tarfile.open(tgz, "r:gz") as tf:
                root = tmp.resolve()
                for m in tf.getmembers():
                    target = (tmp / m.name).resolve()
                    if not target.is_relative_to(root) or m.issym() or m.islnk() or m.isdev():
                        raise DataError(f"archive {tgz} has an unsafe member {m.name!r} (escapes the folder "
                                        f"or is a link/device); refusing to extract. Delete it and rerun to "
                                        f"download a fresh copy.")
                tf.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            raise DataError(f"archive {tgz} is corrupt or truncated ({type(e).__name__}: {e}). Delete it "
                            f"and rerun to download it again, or place a good copy there.") from e
        src = tmp / CIFAR100_DIR
        if not src.is_dir():
            raise DataError(f"archive {tgz} has no {CIFAR100_DIR}/ folder; is it the CIFAR-100 python "
                            f"version? Expected {CIFAR100_URL}.")
        src.replace(into / CIFAR100_DIR)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cifar100_location(data_root):
    """-> (extracted folder, archive path) for --data_root given as the folder holding them, the archive
    itself, or the extracted cifar-100-python folder.

    >>> [str(p) for p in cifar100_location("data")]
    ['data/cifar-100-python', 'data/cifar-100-python.tar.gz']
    >>> [str(p) for p in cifar100_location("dl/c100.tar.gz")]
    ['dl/cifar-100-python', 'dl/c100.tar.gz']
    """
    p = Path(data_root)
    if p.name.endswith((".tar.gz", ".tgz")):
        return p.parent / CIFAR100_DIR, p
    if p.name == CIFAR100_DIR and p.is_dir():
        return p, p.parent / CIFAR100_TGZ
    if p.is_file():
        raise DataError(f"--data_root {p} is a file but not a .tar.gz; pass the CIFAR-100 archive "
                        f"({CIFAR100_TGZ}), its extracted {CIFAR100_DIR}/ folder, or the folder holding either")
    return p / CIFAR100_DIR, p / CIFAR100_TGZ


def ensure_cifar100(data_root: Path, url: str = CIFAR100_URL) -> Path:
    """Return the extracted folder: use it if present, else extract the tar.gz, else download it."""
    folder, tgz = cifar100_location(data_root)
    if folder.is_dir():
        return folder
    if not tgz.exists():
        download_cifar100(tgz, url)
    safe_extract(tgz, folder.parent)
    return folder


def _unpickle(path: Path) -> dict:
    """Load a Python-2 pickle; keys come back as str whether they were pickled as bytes or str."""
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except FileNotFoundError as e:
        raise DataError(f"{path} is missing; the CIFAR-100 folder is incomplete. Delete "
                        f"{path.parent} and rerun to extract it again.") from e
    except Exception as e:
        raise DataError(f"{path} is not a readable CIFAR-100 pickle ({type(e).__name__}: {e}). Delete "
                        f"{path.parent} and rerun.") from e
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def cifar100_fine_names(folder: Path) -> list:
    return [_s(n) for n in _unpickle(Path(folder) / "meta")["fine_label_names"]]


def load_cifar100_split(folder: Path, split: str):
    """-> (images uint8 [N, 32, 32, 3] RGB, fine labels int64 [N], fine names list[str])."""
    folder = Path(folder)
    names = cifar100_fine_names(folder)
    d = _unpickle(folder / split)
    data = np.asarray(d["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{folder / split}: 'data' has shape {data.shape}, expected N x 3072.")
    labels = np.asarray(d["fine_labels"], dtype=np.int64)
    # planes R, G, B of 32x32 each -> HWC
    imgs = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return imgs, labels, names


# ----------------------------------------------------------------------------- images

def upscale(img: Image.Image, size: int, sharpen: bool) -> Image.Image:
    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    if sharpen:
        # undo some of the blur bicubic adds to a 7x upscale; radius in output pixels
        img = img.filter(ImageFilter.UnsharpMask(radius=2, percent=80, threshold=2))
    return img


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    import io
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def folder_image_name(name: str) -> str:
    """Output JPEG name for a source file, from its own name (so adding a file renames nothing).

    >>> folder_image_name("cat 01.jpg"), folder_image_name("cat01.PNG"), folder_image_name("x.jpeg")
    ('cat 01.jpg', 'cat01.PNG.jpg', 'x.jpeg')
    """
    return name if Path(name).suffix.lower() in (".jpg", ".jpeg") else name + ".jpg"


def list_folder_dataset(root: Path):
    """DIR/{train,test}/<class>/* -> {split: {class: [files sorted]}}; classes are subfolder names.
    An empty class folder is an error (it would silently become a class with no images)."""
    root = Path(root)
    out = {}
    for split in ("train", "test"):
        d = root / split
        if not d.is_dir():
            raise DataError(f"--dataset folder expects {d}/<class>/<images>; {d} does not exist.")
        out[split] = {}
        for c in sorted(x for x in d.iterdir() if x.is_dir() and not x.name.startswith(".")):
            files = sorted(p for p in c.iterdir() if p.is_file() and not p.name.startswith("."))
            if not files:
                raise DataError(f"class folder {c} is empty; add its images or remove the folder.")
            names = {}
            for f in files:
                other = names.setdefault(folder_image_name(f.name), f)
                if other != f:
                    raise DataError(f"{other} and {f} would both be saved as {folder_image_name(f.name)}; rename one.")
            out[split][c.name] = files
    return out


DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGITS_TEST_FRAC = 0.2  # held out for test, stratified by class


def write_digits_folder(root) -> Path:
    """scikit-learn's handwritten digits (1,797 real 8x8 scans, shipped inside the package: no download) as
    an image folder ROOT/{train,test}/<digit name>/<index>.png, split 80/20 by class with a fixed seed.
    Grey levels 0-16 become 0-255. Written once: a folder with every file already there is left alone."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from flywheel.io import atomic_write_bytes
    root = Path(root)
    d = load_digits()
    idx = np.arange(len(d.target))
    train, test = train_test_split(idx, test_size=DIGITS_TEST_FRAC, stratify=d.target, random_state=0)
    for split, part in (("train", train), ("test", test)):
        for i in part:
            dst = root / split / DIGIT_NAMES[d.target[i]] / f"digit_{i:04d}.png"
            if dst.exists():
                continue
            buf = io.BytesIO()
            Image.fromarray(np.round(d.images[i] * 255 / 16).astype(np.uint8)).convert("RGB").save(buf, format="PNG")
            atomic_write_bytes(dst, buf.getvalue())
    return root

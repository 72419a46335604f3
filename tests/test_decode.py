"""The one image decoder (flywheel.student.decode_rgb): JPEGs go to torchvision's libjpeg-turbo, everything
else to Pillow, and the pixels must be Pillow's either way, since training, the cache and serving all decode
with it and a model trained on one decoder's pixels is served the other's."""
import io

import numpy as np
import pytest
from PIL import Image

from flywheel.student import decode_rgb


def pillow_rgb(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def photo(mode, seed=0):
    """Noise plus a gradient, odd-sized (97 x 131), so chroma subsampling has edges to get wrong."""
    rng = np.random.default_rng(seed)
    x = (rng.random((97, 131, 3)) * 120 + np.linspace(0, 120, 131)[None, :, None]).astype(np.uint8)
    return Image.fromarray(x).convert(mode)


JPEGS = [{"quality": 90},                                # prep's setting: 4:2:0
         {"quality": 75, "subsampling": 0},              # 4:4:4
         {"quality": 95, "progressive": True}]
CASES = ([("JPEG", kw, mode) for kw in JPEGS for mode in ("RGB", "L", "CMYK")]
         + [(fmt, {}, mode) for fmt in ("PNG", "WEBP", "BMP") for mode in ("RGB", "L")])  # Pillow's path


@pytest.mark.parametrize("fmt,kw,mode", CASES)
def test_decode_equals_pillow_bit_for_bit(tmp_path, monkeypatch, fmt, kw, mode):
    path = tmp_path / f"x.{fmt.lower()}"
    photo(mode).save(path, fmt, **kw)
    with monkeypatch.context() as m:
        if fmt == "JPEG":  # the JPEG must take torchvision's path, or the equality below proves nothing
            m.setattr(Image, "open", lambda *a, **k: pytest.fail("a JPEG went to Pillow"))
        got = decode_rgb(path)
    assert got.dtype == np.uint8 and got.shape == (97, 131, 3)
    assert np.array_equal(got, pillow_rgb(path))


def test_run_images_decode_as_pillow_decodes(tiny_run):
    files = sorted((tiny_run / "run" / "images").rglob("*.jpg"))[:40]
    assert files
    for f in files:
        assert np.array_equal(decode_rgb(f), pillow_rgb(f)), f


@pytest.mark.parametrize("cut", [10, 200, 0.5])
def test_truncated_jpeg_raises_pillows_error(tmp_path, cut):
    buf = io.BytesIO()
    photo("RGB").save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[:int(cut * len(data)) if cut < 1 else cut])
    with pytest.raises(OSError):
        decode_rgb(path)


def test_garbage_and_missing_files_raise(tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8 this is not a JPEG at all" * 3)
    with pytest.raises(OSError):  # PIL.UnidentifiedImageError is an OSError
        decode_rgb(tmp_path / "junk.jpg")
    with pytest.raises(FileNotFoundError):
        decode_rgb(tmp_path / "missing.jpg")

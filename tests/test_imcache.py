"""The memory-mapped image cache: built once, resumed after an interruption, rebuilt when prep changes
the images, and read in chunks that give exactly what decoding every file at once gives."""
import numpy as np
import pytest
import torch

import flywheel.imcache as imcache
from flywheel.imcache import ImageCache
from flywheel.io import read_csv
from flywheel.student import build_model, decode_images, predict_logits


def manifest_rows(run):
    return read_csv(run / "manifest.csv")


@pytest.fixture
def run(prepped12, tmp_path):
    """A private copy of the prepped run folder (the cache is written into it)."""
    import shutil
    shutil.copytree(prepped12 / "run", tmp_path / "run")
    return tmp_path / "run"


def test_cache_holds_every_image_as_decoded(run):
    rows = manifest_rows(run)
    cache = ImageCache(run, rows)
    ref = decode_images([run / r["path"] for r in rows])
    assert cache.x.shape == tuple(ref.shape)
    assert np.array_equal(np.asarray(cache.x), ref.numpy())
    assert (run / "cache").is_dir() and cache.data_path.stat().st_size == ref.numel()


def test_interrupted_build_resumes_where_it_stopped(run, monkeypatch):
    rows = manifest_rows(run)
    real, calls = imcache._decode_hwc, []

    def dies_after_20(path):
        if len(calls) == 20:
            raise KeyboardInterrupt
        calls.append(path)
        return real(path)
    monkeypatch.setattr(imcache, "_decode_hwc", dies_after_20)
    with pytest.raises(KeyboardInterrupt):
        ImageCache(run, rows, workers=1, chunk=8)
    done = np.fromfile(run / "cache" / "images_32x32.done", np.uint8)
    assert done.sum() == 16  # two whole chunks were flushed and marked; the third was not
    calls.clear()
    monkeypatch.setattr(imcache, "_decode_hwc", lambda p: (calls.append(p), real(p))[1])
    cache = ImageCache(run, rows, workers=1, chunk=8)
    assert len(calls) == 1 + len(rows) - 16  # the first image (its size) plus only what was missing
    assert np.array_equal(np.asarray(cache.x), decode_images([run / r["path"] for r in rows]).numpy())


def test_a_changed_manifest_rebuilds_the_cache(run):
    rows = manifest_rows(run)
    ImageCache(run, rows)
    swapped = [dict(r) for r in rows]
    swapped[0], swapped[1] = rows[1], rows[0]  # same files, other order: row i must follow the manifest
    cache = ImageCache(run, swapped)
    assert np.array_equal(np.asarray(cache.x[:2]), decode_images([run / r["path"] for r in swapped[:2]]).numpy())


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_chunked_inference_matches_inference_on_every_image_at_once(run, batch_size):
    rows = manifest_rows(run)
    order = list(reversed(rows))[::2]  # a view in another order than the cache's rows
    view = ImageCache(run, rows).view([r["path"] for r in order])
    torch.manual_seed(0)
    model = build_model(5, "none")
    whole = predict_logits(model, decode_images([run / r["path"] for r in order]), torch.device("cpu"), 10_000)
    chunked = predict_logits(model, view, torch.device("cpu"), batch_size)
    np.testing.assert_allclose(chunked, whole, rtol=1e-4, atol=1e-4)


def test_paths_outside_the_manifest_are_decoded_beside_the_cache(run):
    rows = manifest_rows(run)
    extra = torch.full((1, 3, 32, 32), 7, dtype=torch.uint8)
    view = ImageCache(run, rows).view([rows[3]["path"], "production/x.jpg"], extra=lambda paths: extra)
    got = view[[1, 0]]
    assert got[0].eq(7).all() and torch.equal(got[1], decode_images([run / rows[3]["path"]])[0])
    with pytest.raises(KeyError, match="not in the manifest"):
        ImageCache(run, rows).view(["production/x.jpg"])

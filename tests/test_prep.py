"""Prep step: CIFAR-100 archive (folder and tar.gz, Python-2 pickles), counts, JPEGs, manifest,
errors, idempotence, and the image-folder dataset."""
import io
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from fakes import COLOURS, CIFAR5, make_cifar_folder, make_cifar_tgz, make_image_folder, mean_rgb, run_cli
from flywheel.io import read_csv, read_json, sha256_file


def prep(tmp_path, data, *extra):
    out = tmp_path / "run"
    run_cli("--step", "prep", "--data_root", data, "--out_dir", out, "--img_size", 40, *extra)
    return out


def check_run(out, n_train, n_test):
    rows = read_csv(out / "manifest.csv")
    assert list(rows[0]) == ["path", "split", "label", "source_index", "sha256"]
    for split, n in (("train", n_train), ("test", n_test)):
        for c in CIFAR5:
            assert sum(r["split"] == split and r["label"] == c for r in rows) == n
    for r in rows:
        p = out / r["path"]
        assert p.parent.name == r["label"] and p.parent.parent.name == r["split"]
        assert p.name == f"{r['label']}_{int(r['source_index']):05d}.jpg"
        with Image.open(p) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (40, 40))
        assert sha256_file(p) == r["sha256"]
        # ground truth: the pixels carry the class colour, so a swapped channel or label mapping fails
        assert np.abs(mean_rgb(p) - np.array(COLOURS[r["label"]])).max() < 25, (r, mean_rgb(p))
    assert not any(r["label"] == "bear" for r in rows)  # a class that was not asked for
    return rows


def test_prep_from_extracted_folder(tmp_path):
    make_cifar_folder(tmp_path / "data", n_train=4, n_test=2)
    rows = check_run(prep(tmp_path, tmp_path / "data"), 4, 2)
    # source_index is the position in the official split array: classes interleave, 6 per round
    assert sorted(int(r["source_index"]) for r in rows if r["split"] == "train" and r["label"] == "apple") == [0, 6, 12, 18]


def test_prep_from_tgz_and_max_per_class(tmp_path):
    make_cifar_tgz(tmp_path / "data", n_train=5, n_test=3)
    out = prep(tmp_path, tmp_path / "data", "--max_per_class", 2)
    check_run(out, 2, 2)
    assert (tmp_path / "data" / "cifar-100-python" / "meta").exists()
    assert not list((tmp_path / "data").glob(".extract.*"))


@pytest.mark.parametrize("classes,bad", [("apple,foo", "foo"), ("Apple,pear", "Apple"), ("pear,pear", "duplicates")])
def test_unknown_class_rejected_before_work(tmp_path, capsys, classes, bad):
    make_cifar_folder(tmp_path / "data", n_train=1, n_test=1)
    with pytest.raises(SystemExit) as e:
        prep(tmp_path, tmp_path / "data", "--classes", classes)
    assert bad in str(e.value) and "--classes" in str(e.value)
    assert not (tmp_path / "run" / "manifest.csv").exists() and not (tmp_path / "run" / "images").exists()


@pytest.mark.parametrize("kind", ["truncated", "garbage", "escape"])
def test_bad_archive_clear_error_no_half_output(tmp_path, kind):
    data = tmp_path / "data"
    tgz = make_cifar_tgz(data, n_train=2, n_test=1)
    if kind == "truncated":
        tgz.write_bytes(tgz.read_bytes()[: tgz.stat().st_size // 2])
    elif kind == "garbage":
        tgz.write_bytes(b"not a tarball at all" * 50)
    else:
        with tarfile.open(tgz, "w:gz") as tf:
            info = tarfile.TarInfo("cifar-100-python/../../evil.txt")
            info.size = 4
            tf.addfile(info, io.BytesIO(b"evil"))
    with pytest.raises(SystemExit) as e:  # the package's DataError, turned into a message by the script
        prep(tmp_path, data)
    msg = str(e.value)
    assert str(tgz) in msg and ("corrupt" in msg or "unsafe" in msg)
    assert not (data / "cifar-100-python").exists() and not list(data.glob(".extract.*"))
    assert not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "run" / "manifest.csv").exists()


def test_download_failure_names_url_and_manual_path(tmp_path, monkeypatch):
    from flywheel import data as D
    # 127.0.0.1:9 (discard port) refuses at once: no network is touched
    monkeypatch.setattr(D, "CIFAR100_URL", "http://127.0.0.1:9/cifar-100-python.tar.gz")
    with pytest.raises(D.DataError) as e:
        D.ensure_cifar100(tmp_path / "data", url=D.CIFAR100_URL)
    assert "http://127.0.0.1:9/cifar-100-python.tar.gz" in str(e.value)
    assert str(tmp_path / "data" / "cifar-100-python.tar.gz") in str(e.value)
    assert not list((tmp_path / "data").glob("*.part"))


def test_rerun_idempotent_and_settings_change_regenerates(tmp_path):
    make_cifar_folder(tmp_path / "data", n_train=2, n_test=1)
    out = prep(tmp_path, tmp_path / "data")
    p = next((out / "images" / "train" / "apple").iterdir())
    mtime = p.stat().st_mtime_ns
    assert read_json(out / "prep.json")["made"] == 15
    before = (out / "prep.json").read_bytes()
    prep(tmp_path, tmp_path / "data")  # unchanged source and settings: the step does nothing at all
    assert (out / "prep.json").read_bytes() == before and p.stat().st_mtime_ns == mtime
    prep(tmp_path, tmp_path / "data", "--force")  # forced: every image made with the same settings is kept
    assert read_json(out / "prep.json")["made"] == 0 and p.stat().st_mtime_ns == mtime
    sha_sharp = {r["path"]: r["sha256"] for r in read_csv(out / "manifest.csv")}
    prep(tmp_path, tmp_path / "data", "--no_sharpen")
    assert read_json(out / "prep.json")["made"] == 15
    sha_plain = {r["path"]: r["sha256"] for r in read_csv(out / "manifest.csv")}
    assert sha_plain.keys() == sha_sharp.keys() and sha_plain != sha_sharp
    run_cli("--step", "prep", "--data_root", tmp_path / "data", "--out_dir", out, "--img_size", 24, "--no_sharpen")
    with Image.open(p) as im:
        assert im.size == (24, 24)


def test_folder_dataset_with_unreadable_file(tmp_path):
    root = make_image_folder(tmp_path / "mydata")
    (root / "train" / "red" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    out = tmp_path / "run"
    run_cli("--step", "prep", "--dataset", "folder", "--data_root", root, "--out_dir", out, "--img_size", 32)
    rows = read_csv(out / "manifest.csv")
    assert {r["label"] for r in rows} == {"red", "green", "blue"}
    assert sum(r["split"] == "train" for r in rows) == 12 and sum(r["split"] == "test" for r in rows) == 6
    info = read_json(out / "prep.json")
    assert len(info["skipped"]) == 1 and info["skipped"][0]["file"].endswith("broken.jpg")
    for r in rows:
        with Image.open(out / r["path"]) as im:
            assert im.size == (32, 32)
    with pytest.raises(SystemExit, match="purple"):
        run_cli("--step", "prep", "--dataset", "folder", "--data_root", root, "--out_dir", out, "--classes", "red,purple")


@pytest.fixture
def archive_server(tmp_path):
    """Serves tmp_path/srv over HTTP on 127.0.0.1 (a stand-in for the official download URL)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
    srv_dir = tmp_path / "srv"
    tgz = make_cifar_tgz(srv_dir, n_train=2, n_test=1)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(srv_dir))
    handler.log_message = lambda *a: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/{tgz.name}", tgz
    httpd.shutdown()
    httpd.server_close()


def test_download_checks_md5_and_renames_into_place(tmp_path, archive_server):
    from flywheel import data as D
    url, tgz = archive_server
    dest = tmp_path / "data" / "cifar-100-python.tar.gz"
    D.download_cifar100(dest, url=url, md5=D.md5_file(tgz))
    assert dest.read_bytes() == tgz.read_bytes() and not dest.with_name(dest.name + ".part").exists()
    D.safe_extract(dest, dest.parent)
    assert (dest.parent / "cifar-100-python" / "meta").exists()


def test_download_with_wrong_md5_keeps_nothing(tmp_path, archive_server):
    from flywheel import data as D
    url, _ = archive_server
    dest = tmp_path / "data" / "cifar-100-python.tar.gz"
    with pytest.raises(D.DataError, match="MD5"):
        D.download_cifar100(dest, url=url, md5="0" * 32)
    assert not dest.exists() and not list(dest.parent.glob("*.part"))


# ----------------------------------------------------------------------------- folder datasets (issue 10)

def folder_prep(root, out, *extra):
    run_cli("--step", "prep", "--dataset", "folder", "--data_root", root, "--out_dir", out, "--img_size", 16, *extra)


def test_folder_names_come_from_the_files_so_an_added_file_renames_nothing(tmp_path):
    root = make_image_folder(tmp_path / "d", n_train=4)
    out = tmp_path / "run"
    folder_prep(root, out)
    before = {r["path"]: r["sha256"] for r in read_csv(out / "manifest.csv")}
    Image.new("RGB", (20, 20), (1, 2, 3)).save(root / "train" / "red" / "aaa_first.png")  # sorts first
    folder_prep(root, out)
    after = {r["path"]: r["sha256"] for r in read_csv(out / "manifest.csv")}
    assert all(after[p] == sha for p, sha in before.items())  # every old name still holds its old image
    assert len(after) == len(before) + 1 and "images/train/red/aaa_first.png.jpg" in after
    assert len(set(after.values())) == len(after)  # no two names hold the same image


def test_train_image_equal_to_a_test_image_is_kept_out_of_training(tmp_path):
    root = make_image_folder(tmp_path / "d")
    shutil.copy(root / "test" / "green" / "green1.png", root / "train" / "green" / "copied.png")
    out = tmp_path / "run"
    folder_prep(root, out)
    rows = read_csv(out / "manifest.csv")
    assert not any(r["path"].endswith("copied.png.jpg") for r in rows)
    dups = read_json(out / "prep.json")["cross_split_duplicates"]
    assert dups == [{"train": "images/train/green/copied.png.jpg", "test": "images/test/green/green1.png.jpg"}]


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    root = make_image_folder(tmp_path / "d")
    (root / "train" / "purple").mkdir()
    with pytest.raises(SystemExit, match="purple.* is empty"):
        folder_prep(root, tmp_path / "run")


def test_small_class_warns(tmp_path, caplog):
    root = make_image_folder(tmp_path / "d", n_train=3)
    folder_prep(root, tmp_path / "run")
    assert any("only 3 training image" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("given", ["archive", "extracted"])
def test_data_root_may_name_the_archive_or_the_extracted_folder(tmp_path, given):
    tgz = make_cifar_tgz(tmp_path / "dl", n_train=2, n_test=1)
    root = tgz if given == "archive" else tgz.parent / "cifar-100-python"
    if given == "extracted":
        from flywheel.data import safe_extract
        safe_extract(tgz, tgz.parent)
    run_cli("--step", "prep", "--data_root", root, "--out_dir", tmp_path / "run", "--img_size", 16)
    assert len(read_csv(tmp_path / "run" / "manifest.csv")) == 5 * 3

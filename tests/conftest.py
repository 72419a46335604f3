import os
import shutil
import sys
from pathlib import Path

# pytest-xdist runs one worker per core, and each worker's torch (and every server or CLI it starts) would
# otherwise start one thread per core as well: on 2 cores, 2 workers x 2 threads wait on each other and the
# suite took 362-424 s against 282 s with one thread each. Each worker gets its share of the cores; a value
# set by hand wins, so `OMP_NUM_THREADS=2 uv run pytest` still runs the tests on several threads.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

# a tiny run: 32px colour-coded images, blended so the student is unsure of some (see fakes.py)
TINY = {"n_train": 50, "n_test": 16, "mix": 0.55}
TRAIN_FLAGS = ["--weights", "none", "--epochs", 4, "--batch_size", 16]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """prep -> label (SIMULATED oracle teacher) -> train -> eval -> cascade (SIMULATED human), one epoch-ish.
    Tests that change files copy it with `copy_run`."""
    from fakes import make_cifar_folder, run_cli
    d = tmp_path_factory.mktemp("tiny")
    make_cifar_folder(d / "data", **TINY)
    common = ["--out_dir", d / "run", "--data_root", d / "data", "--teacher", "oracle", "--simulate_human"]
    run_cli("--step", "prep", *common, "--img_size", 32)
    run_cli("--step", "label", *common, "--max_label", 120, "--second_pass", "fitted")  # the labels the tests were built on
    run_cli("--step", "train", *common, *TRAIN_FLAGS)
    run_cli("--step", "eval", *common)
    run_cli("--step", "cascade", *common)
    return d


@pytest.fixture
def copy_run(tiny_run, tmp_path):
    shutil.copytree(tiny_run, tmp_path / "t")
    return tmp_path / "t"


@pytest.fixture(scope="session")
def exported_run(tiny_run, tmp_path_factory):
    """A copy of the tiny run with --step export done (the analysis scripts write next to it)."""
    from fakes import run_cli
    d = tmp_path_factory.mktemp("exported") / "t"
    shutil.copytree(tiny_run, d)
    run_cli("--step", "export", "--out_dir", d / "run", "--data_root", d / "data", "--teacher", "oracle")
    return d / "run"


@pytest.fixture(scope="session")
def prepped12(tmp_path_factory):
    """12 training and 2 test images per class, prepped at 32px, never labeled (copy it with `run`)."""
    from fakes import make_cifar_folder, run_cli
    d = tmp_path_factory.mktemp("prepped")
    make_cifar_folder(d / "data", n_train=12, n_test=2)
    run_cli("--step", "prep", "--data_root", d / "data", "--out_dir", d / "run", "--img_size", 32)
    return d


@pytest.fixture
def run(prepped12, tmp_path, monkeypatch):
    """A private copy of prepped12 (run folder + data) with a test API key in the environment."""
    from fakes import KEY
    shutil.copytree(prepped12 / "run", tmp_path / "run")
    shutil.copytree(prepped12 / "data", tmp_path / "data")
    monkeypatch.setenv("OPENROUTER_API_KEY", KEY)
    return tmp_path / "run"

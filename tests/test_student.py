"""Student training: the BatchNorm pitfall, exact resume, no test leakage, eval.json consistency."""
import numpy as np
import pytest
import torch

from fakes import make_cifar_folder, run_cli
from flywheel import student as S
from flywheel.calibrate import classification_metrics
from flywheel.io import read_csv, read_json

CLASSES = ["r", "g", "b", "y"]
COLS = torch.tensor([[220, 30, 30], [30, 200, 40], [30, 40, 210], [220, 210, 30]], dtype=torch.int16)


def colour_set(n_per_class, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(len(CLASSES)).repeat_interleave(n_per_class)
    x = COLS[y].view(-1, 3, 1, 1) + torch.randint(-20, 21, (len(y), 3, size, size), generator=g, dtype=torch.int16)
    return x.clamp(0, 255).to(torch.uint8), y.numpy()


CFG = {"epochs": 2, "batch_size": 16, "lr": 3e-3, "weight_decay": 0.0, "seed": 0}


def test_from_scratch_beats_chance_in_eval_mode(tmp_path):
    x, y = colour_set(24)
    xv, yv = colour_set(8, seed=1)
    best = S.train_student(x, y, xv, yv, CLASSES, CFG, tmp_path, "none", torch.device("cpu"))
    model = S.model_from_checkpoint(best)
    acc = (S.predict_logits(model, xv, torch.device("cpu")).argmax(1) == yv).mean()
    assert acc >= 0.9, acc  # chance is 0.25
    # the pitfall is real: with running statistics left at their initial values, eval mode collapses
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
    broken = (S.predict_logits(model, xv, torch.device("cpu")).argmax(1) == yv).mean()
    S.recalibrate_bn(model, x, torch.device("cpu"))
    fixed = (S.predict_logits(model, xv, torch.device("cpu")).argmax(1) == yv).mean()
    assert broken < 0.6 and fixed >= 0.9, (broken, fixed)


def test_resume_after_interrupted_epoch_matches_uninterrupted(tmp_path):
    x, y = colour_set(12)
    xv, yv = colour_set(4, seed=1)
    cfg = {**CFG, "epochs": 3}
    ref = S.train_student(x, y, xv, yv, CLASSES, cfg, tmp_path / "a", "none", torch.device("cpu"))

    def crash(epoch, step):
        if epoch == 1 and step == 1:
            raise KeyboardInterrupt  # mid-epoch 2, after last.pt of epoch 1 was written
    with pytest.raises(KeyboardInterrupt):
        S.train_student(x, y, xv, yv, CLASSES, cfg, tmp_path / "b", "none", torch.device("cpu"), _on_batch=crash)
    assert S.load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 0
    res = S.train_student(x, y, xv, yv, CLASSES, cfg, tmp_path / "b", "none", torch.device("cpu"), resume=True)
    last_a = S.load_checkpoint(tmp_path / "a" / "last.pt")
    last_b = S.load_checkpoint(tmp_path / "b" / "last.pt")
    for k, v in last_a["model"].items():
        assert torch.equal(v, last_b["model"][k]), k
    assert [h["train_loss"] for h in ref["history"]] == [h["train_loss"] for h in res["history"]]
    assert last_b["epoch"] == 2 and set(last_b) >= {"model", "optimizer", "scheduler", "epoch", "best_val_acc",
                                                    "config", "classes", "rng"}


def test_resume_refuses_other_classes(tmp_path):
    x, y = colour_set(4)
    S.train_student(x, y, x, y, CLASSES, {**CFG, "epochs": 1}, tmp_path, "none", torch.device("cpu"))
    with pytest.raises(S.StudentError, match="resume"):
        S.train_student(x, y, x, y, CLASSES[::-1], {**CFG, "epochs": 1}, tmp_path, "none", torch.device("cpu"),
                        resume=True)


def test_imagenet_weights_unreachable_names_the_fix(monkeypatch):
    import torchvision.models.mobilenetv3 as mv3

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(mv3.MobileNet_V3_Small_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    monkeypatch.setattr(S, "reachable", lambda url: True)  # the host answers, the download still fails
    monkeypatch.setenv("TORCH_HOME", "/nonexistent-torch-home")  # and nothing is cached
    with pytest.raises(S.WeightsError) as e:
        S.build_model(5, "imagenet")
    assert "--weights none" in str(e.value) and "checkpoints" in str(e.value) and "no network" in str(e.value)


def test_augment_shapes_and_determinism():
    x, _ = colour_set(2, size=24)
    a = S.augment(x, torch.Generator().manual_seed(0))
    b = S.augment(x, torch.Generator().manual_seed(0))
    assert a.shape == (8, 3, 24, 24) and a.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize("labels,frac,min_val", [([0] * 10 + [1] * 10, 0.1, 2), ([0, 0, 1, 1, 1], 0.1, 2),
                                                 ([0, 1], 0.2, 0), ([0] * 100, 0.25, 1)])
def test_hash_split_partitions_and_every_class_validates(labels, frac, min_val):
    keys = [f"sha{i}" for i in range(len(labels))]
    tr, va = S.hash_split(keys, labels, frac, 0)
    assert sorted(tr.tolist() + va.tolist()) == list(range(len(labels))) and len(va) >= min_val
    for c in set(labels):  # a class of 2+ items always has one in validation
        if labels.count(c) >= 2:
            assert any(labels[i] == c for i in va)


def test_hash_split_fraction_and_stability_under_edits():
    rng = np.random.default_rng(0)
    keys, labels = [f"{i:064x}" for i in range(3000)], rng.integers(0, 5, 3000).tolist()
    tr, va = S.hash_split(keys, labels, 0.1, 0)
    assert 0.08 < len(va) / 3000 < 0.12
    edited = labels[:]
    edited[17] = (edited[17] + 1) % 5  # one edited label moves no image between train and val
    assert S.hash_split(keys, edited, 0.1, 0)[1].tolist() == va.tolist()
    more = S.hash_split(keys + ["new1", "new2"], labels + [0, 1], 0.1, 0)[1]  # new images move no old one
    assert [i for i in more.tolist() if i < 3000] == va.tolist()
    assert S.hash_split(keys, labels, 0.1, 1)[1].tolist() != va.tolist()  # the seed matters


def test_train_eval_pipeline_no_leak_and_consistent_metrics(tmp_path):
    make_cifar_folder(tmp_path / "data", n_train=16, n_test=6, mix=0.6)
    out = tmp_path / "run"
    common = ["--out_dir", out, "--data_root", tmp_path / "data"]
    run_cli("--step", "prep", *common, "--img_size", 32)
    run_cli("--step", "label", *common, "--teacher", "oracle", "--max_label", 60)
    run_cli("--step", "train", *common, "--weights", "none", "--epochs", 2, "--batch_size", 16)
    run_cli("--step", "eval", *common)
    manifest = {r["path"]: r for r in read_csv(out / "manifest.csv")}
    rows = read_csv(out / "artifacts" / "train_rows.csv")
    test = {p for p, r in manifest.items() if r["split"] == "test"}
    assert rows and all(manifest[r["path"]]["split"] == "train" for r in rows)
    assert not test & {r["path"] for r in rows}
    assert {r["source"] for r in rows} == {"oracle"}
    e = read_json(out / "artifacts" / "eval.json")
    for k in ("accuracy", "macro_f1", "classes", "confusion_matrix", "report", "ece_before", "ece_after",
              "temperature", "coverage_at_precision", "teacher_accuracy", "student_teacher_agreement",
              "n_train", "n_val", "n_test", "label_sources"):
        assert k in e, k
    assert set(e["coverage_at_precision"]) == {"0.90", "0.95", "0.99"}
    preds = read_csv(out / "artifacts" / "test_predictions.csv")
    assert {p["path"] for p in preds} == test and e["n_test"] == len(test)
    m = classification_metrics([e["classes"].index(p["true"]) for p in preds],
                               [e["classes"].index(p["pred"]) for p in preds], e["classes"])
    assert m["accuracy"] == e["accuracy"] and m["confusion_matrix"] == e["confusion_matrix"]
    assert e["n_train"] + e["n_val"] == len(rows) and e["temperature"] > 0
    ck = S.load_checkpoint(out / "artifacts" / "best.pt")
    assert ck["temperature"] == e["temperature"] and not set(ck["val_paths"]) & test
    assert isinstance(torch.load(out / "artifacts" / "mobilenet.pt"), dict)


def test_linear_probe_fits_the_head_alone():
    """lpft's first stage: the head fits the frozen features of the training images; nothing else moves."""
    x, y = colour_set(6)
    m = S.build_model(len(CLASSES), "imagenet", "efficientnet_lite0")  # installed: no network
    before = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("classifier")}
    S.linear_probe(m, x, y, torch.device("cpu"), 16, 0)
    after = m.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    with torch.no_grad():
        acc = float((m.eval()(S.normalize(x)).argmax(1).numpy() == y).mean())
    assert acc >= 0.9, acc


@pytest.mark.parametrize("recipe", ["lpft", "plain"])
def test_every_recipe_trains_and_records_itself(tmp_path, recipe):
    x, y = colour_set(4)
    best = S.train_student(x, y, x, y, CLASSES, {**CFG, "epochs": 1, "recipe": recipe}, tmp_path, "none", torch.device("cpu"))
    assert best["config"]["recipe"] == recipe and len(best["history"]) == 1

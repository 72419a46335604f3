"""The sibling scripts on a tiny finished run: speed test JSON, plots, breakeven outputs."""
import json

import numpy as np
import pytest
from PIL import Image

import cost_breakeven
import plot_confusion
import simple_speed_test
from flywheel.io import read_csv, read_json


def test_speed_test_all_backends_positive(exported_run, tmp_path):
    out = tmp_path / "speed.json"
    simple_speed_test.main(["--root", str(exported_run), "--backend", "all", "--max_images", "16", "--batch_size", "8",
                            "--json", str(out)])
    s = read_json(out)
    assert set(s["machine"]) >= {"cpu", "cores", "torch", "onnxruntime"}
    assert {r["backend"] for r in s["results"]} == set(simple_speed_test.BACKENDS)
    for r in s["results"]:
        for k in ("model_img_per_s", "e2e_img_per_s", "p50_ms_b1", "p95_ms_b1"):
            assert r[k] > 0, (r["backend"], k)
        assert r["device"] == "cpu" and r["batch_size"] == 8 and r["p95_ms_b1"] >= r["p50_ms_b1"]
        for k in ("model_img_per_s", "e2e_img_per_s"):  # the median of repeated timings, within its own spread
            assert r[f"{k}_min"] <= r[k] <= r[f"{k}_max"] and r["repeats"] == simple_speed_test.DEFAULT_REPEATS


@pytest.mark.parametrize("xs,want", [([3.0], (3.0, 3.0, 3.0)), ([1.0, 9.0, 2.0, 3.0], (2.5, 1.0, 9.0))])
def test_spread_median_min_max(xs, want):
    assert tuple(simple_speed_test.spread(xs).values()) == want


def test_speed_test_default_is_ort_with_torch_baseline(exported_run, tmp_path):
    out = tmp_path / "s.json"
    res = simple_speed_test.main(["--root", str(exported_run), "--max_images", "8", "--batch_size", "4", "--json", str(out)])
    assert [r["backend"] for r in res] == ["original", "torch", "onnxruntime"] and res[1]["speedup_vs_torch"] == 1.0
    assert res[0]["speedup_vs_original"] == 1.0 and res[0]["model_img_per_s_min"] > 0


def test_original_path_preprocesses_like_the_pipeline(exported_run):
    """The baseline must feed the model the same numbers, or its speed says nothing about the same job."""
    import torch

    from flywheel.run import Paths, heldout_rows, load_manifest
    from flywheel.export import load_images
    from flywheel.student import normalize
    P = Paths(exported_run)
    files = [P.out / r["path"] for r in heldout_rows(load_manifest(P))][:4]
    a = simple_speed_test.original_preprocess(32)(files)
    b = normalize(torch.from_numpy(load_images(files)).permute(0, 3, 1, 2)).numpy()  # as training decodes
    assert a.shape == b.shape and np.abs(a - b).max() < 1e-5


def test_plots_are_real_images(exported_run):
    out = plot_confusion.main(["--root", str(exported_run)])
    for name in ("confusion_matrix", "reliability", "per_class_f1", "cascade_tradeoff"):
        with Image.open(out[name]) as im:
            a = np.asarray(im.convert("L"), np.float32)
            assert im.size[0] > 300 and im.size[1] > 200 and a.std() > 10, name  # not blank
    rep = (exported_run / "artifacts" / "classification_report.txt").read_text()
    ev = read_json(exported_run / "artifacts" / "eval.json")
    assert f"{ev['accuracy']:.4f}" in rep and all(c in rep for c in ev["classes"])


def test_plots_missing_artifact_names_the_step(tmp_path):
    with pytest.raises(SystemExit, match="--step eval"):
        plot_confusion.main(["--root", str(tmp_path)])


def test_breakeven_from_run(exported_run, tmp_path):
    simple_speed_test.main(["--root", str(exported_run), "--max_images", "8", "--batch_size", "4"])
    out = cost_breakeven.main(["--root", str(exported_run), "--fixed_monthly_usd", "1", "--out_prefix", str(tmp_path / "be")])
    ls = read_json(exported_run / "label_summary.json")
    cas = read_json(exported_run / "artifacts" / "cascade.json")
    assert out["inputs"]["labeling_usd"] == ls["cost_usd"] and out["inputs"]["escalation_rate"] == cas["test"]["escalation_rate"]
    assert out["inputs"]["simulated_costs"] is True
    for ext in ("json", "csv", "png"):
        assert (tmp_path / f"be.{ext}").stat().st_size > 100
    assert len(read_csv(tmp_path / "be.csv")) == 5


def test_breakeven_hand_computed_with_fixed_cost(tmp_path, capsys):
    # saving per item = 0.0004 - (0.002/1000 + 0.2 * 0.0004) = 0.000318 -> breakeven 20 / 0.000318 = 62,893
    out = cost_breakeven.main(["--llm_cost", "0.0004", "--escalation_rate", "0.2", "--student_cost_per_1k", "0.002",
                               "--fixed_monthly_usd", "20", "--labeling_usd", "0.6", "--volumes", "1000,1000000",
                               "--json", str(tmp_path / "b.json"), "--out_prefix", str(tmp_path / "b")])
    assert out["breakeven_volume"] == pytest.approx(20 / 0.000318)
    low, high = out["rows"]
    assert low["flywheel_usd"] == pytest.approx(20 + 1000 * (0.000002 + 0.00008))
    assert low["savings_usd"] < 0 and low["savings_pct"] is None and low["verdict"] == "flywheel costs more"
    assert high["savings_pct"] == pytest.approx(100 * (400 - 102) / 400)
    assert out["payback_months"] == pytest.approx(0.6 / (40 - 28.2))
    text = capsys.readouterr().out
    assert "costs $19.68 more" in text and "-166" not in text
    assert json.loads((tmp_path / "b.json").read_text())["breakeven_volume"] == pytest.approx(62893.08, rel=1e-6)


def test_breakeven_never_when_escalation_costs_more():
    from flywheel.costs import breakeven_volume
    assert breakeven_volume(0.6, 0.0002, 0.0, 5.0, escalated_item_cost=0.0004) is None  # 0.6 * 2 calls > 1 call


@pytest.mark.parametrize("argv,flag", [([], "--llm_cost"), (["--llm_cost", "0.001"], "--escalation_rate"),
                                       (["--llm_cost", "0.001", "--escalation_rate", "0.1"], "--student_cost_per_1k"),
                                       (["--llm_cost", "0.001", "--escalation_rate", "1.5", "--student_cost_per_1k", "0"], "escalation_rate")])
def test_breakeven_missing_or_bad_input_names_the_flag(argv, flag):
    with pytest.raises(SystemExit, match=flag):
        cost_breakeven.main(argv)


def test_scripts_agree_on_the_promoted_turn(exported_run, tmp_path, capsys):
    """A run whose turn 1 wins on validation (built on purpose: a copy of turn 0 scored higher): the speed
    test writes speed.json beside turn 1's student, breakeven finds it there, plot_confusion draws turn 1."""
    import shutil
    from flywheel.io import write_json
    from flywheel.student import load_checkpoint, save_checkpoint
    run = tmp_path / "run"
    shutil.copytree(exported_run, run)
    art = run / "artifacts"
    (art / "speed.json").unlink(missing_ok=True)  # another test timed turn 0 on the shared run
    (art / "turn_1").mkdir()
    for f in ("best.pt", "eval.json", "cascade.json", "train_rows.csv"):
        shutil.copy(art / f, art / "turn_1" / f)
    ck = load_checkpoint(art / "turn_1" / "best.pt")
    ck["best_val_acc"] = 1.01
    save_checkpoint(art / "turn_1" / "best.pt", ck)
    write_json(art / "flywheel.json", {"turns": [{"turn": k, "accuracy": 0.5, "macro_f1": 0.5, "escalation_rate": 0.5} for k in (0, 1)]})
    simple_speed_test.main(["--root", str(run), "--max_images", "8", "--batch_size", "4", "--repeats", "1"])
    assert json.loads((art / "turn_1" / "speed.json").read_text())["turn"] == 1 and not (art / "speed.json").exists()
    cost_breakeven.main(["--root", str(run), "--out_prefix", str(tmp_path / "be")])
    assert "inputs from turn 1" in capsys.readouterr().out
    out = plot_confusion.main(["--root", str(run)])
    assert "drawing turn 1" in capsys.readouterr().out
    assert out["confusion_matrix"].parent == art / "turn_1"


def test_speed_test_times_the_other_student_beside_it_as_speed_only(exported_run, tmp_path):
    out = tmp_path / "speed.json"
    res = simple_speed_test.main(["--root", str(exported_run), "--max_images", "8", "--batch_size", "4", "--repeats", "1",
                                  "--other_student", "--json", str(out)])
    mine = {r["backend"] for r in res if r["student"] == "mobilenet_v3_small" and not r.get("speed_only")}
    other = {r["backend"] for r in res if r["student"] == "efficientnet_lite0"}
    assert mine == {"original", "torch", "onnxruntime"} and other == {"torch", "onnxruntime"}
    assert all(r["speed_only"] and r["model_img_per_s"] > 0 for r in res if r["student"] == "efficientnet_lite0")
    assert [r["student"] for r in read_json(out)["results"]] == [r["student"] for r in res]

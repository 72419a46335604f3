"""Label step end to end against the loopback server: ledger, resume after kill -9, budget, dry run,
gold gate, human edits, adaptive second pass, and the API key never written anywhere."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fakes import KEY, ledger_records, run_cli, truth_by_sha
from flywheel.io import read_csv, read_json
from flywheel.ledger import training_labels
from loopback import LoopbackTeacher

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["apple", "mushroom", "orange", "pear", "sweet_pepper"]


truth = truth_by_sha


def label(run, srv, *extra):
    return run_cli("--step", "label", "--out_dir", run, "--data_root", run.parent / "data", "--llm_base_url", srv.url,
                   "--llm_model", "test/model", "--max_workers", 4, *ALWAYS, *extra)


# these tests are about the ledger's mechanics over two passes (resume, kill -9, budget, disagreement): pinned to
# the rule that always asks both; the label model's own choices are tested in test_labelmodel.py
ALWAYS = ["--second_pass", "always"]


ledger = ledger_records


def test_happy_path_outputs(run):
    with LoopbackTeacher(truth(run), CLASSES, cost=0.0003) as srv:
        label(run, srv, "--max_label", 20)
    s = read_json(run / "label_summary.json")
    assert s["requested_images"] == 20 and s["accepted"] == 20 and s["calls"] == 40
    assert s["agreement_rate"] == 1.0 and s["teacher_accuracy"] == 1.0
    assert s["cost_usd"] == pytest.approx(40 * 0.0003) and not s["cost_estimated"]
    assert (s["prompt_tokens"], s["completion_tokens"]) == (40 * 400, 40 * 20)
    assert all(v == 1 for v in srv.requests.values()) and len(srv.requests) == 40
    rows = read_csv(run / "review_labels.csv")
    assert list(rows[0]) == ["path", "llm_label", "confidence", "label_final", "status"] and len(rows) == 20
    assert list(read_csv(run / "labels_llm.csv")[0]) == ["path", "llm_label", "confidence"]
    recs = ledger(run)
    r = recs[0]
    for k in ("path", "sha256", "pass", "model", "host", "prompt_version", "label", "confidence", "raw", "status",
              "prompt_tokens", "completion_tokens", "cost_usd", "ts"):
        assert k in r, k
    assert r["host"].startswith("127.0.0.1:") and r["source"] == "llm"
    # the second pass is independent in a way that matters: another class order, temperature > 0
    p2 = [x for x in recs if x["pass"] == 2]
    assert all(x["temperature"] > 0 and x["class_order"] != CLASSES for x in p2)


def test_rerun_pays_nothing_and_model_change_asks_again(run):
    with LoopbackTeacher(truth(run), CLASSES) as srv:
        label(run, srv, "--max_label", 10)
        label(run, srv, "--max_label", 10)
        assert sum(srv.requests.values()) == 20
        label(run, srv, "--max_label", 10, "--llm_model", "other/model")
        assert sum(srv.requests.values()) == 40
    assert {r["model"] for r in ledger(run)} == {"test/model", "other/model"} and len(ledger(run)) == 40


def test_disagreement_and_low_confidence_kept_and_reported(run):
    with LoopbackTeacher(truth(run), CLASSES, confidence=0.5) as srv:
        label(run, srv, "--max_label", 6, "--second_pass", "always")  # the mean-confidence floor of the always rule
    assert {r["status"] for r in read_csv(run / "review_labels.csv")} == {"low_confidence"}
    with LoopbackTeacher(truth(run), CLASSES, wrong_rate=0.5, seed=3) as srv:
        label(run, srv, "--max_label", 6, "--llm_model", "noisy")
    s = read_json(run / "label_summary.json")
    assert s["disagreed"] > 0 and s["disagreed"] + s["accepted"] + s["low_confidence"] == 6


def test_invalid_replies_reasked_within_bound(run):
    with LoopbackTeacher(truth(run), CLASSES, style="outside") as srv:
        label(run, srv, "--max_label", 3, "--max_invalid", 2)
        assert sorted(srv.requests.values()) == [3, 3, 3]  # pass 1 only: 1 ask + 2 re-asks, never accepted
        label(run, srv, "--max_label", 3, "--max_invalid", 2)
        assert sorted(srv.requests.values()) == [3, 3, 3]  # the bound holds across runs
    s = read_json(run / "label_summary.json")
    assert s["invalid"] == 3 and s["accepted"] == 0 and s["calls_invalid"] == 9


def test_kill_minus_9_then_resume_pays_nothing_twice(run):
    with LoopbackTeacher(truth(run), CLASSES, latency_s=0.15) as srv:
        env = {**os.environ, "OPENROUTER_API_KEY": KEY}
        cmd = [sys.executable, str(ROOT / "cifar_distill.py"), "--step", "label", "--out_dir", str(run),
               "--data_root", str(run.parent / "data"), "--llm_base_url", srv.url, "--llm_model", "test/model",
               "--max_workers", "3", "--max_label", "40"]
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline:
            if (run / "labels.jsonl").exists() and len(ledger(run)) >= 12:
                break
            time.sleep(0.02)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        before = {(r["sha256"], r["pass"]) for r in ledger(run) if r["status"] == "ok"}
        answered_before = sum(srv.completed.values())
        assert 12 <= len(before) < 80
        # nothing paid for is lost: every answer the server sent is in the ledger, but the calls in flight
        assert answered_before - len(before) <= 3
        srv.latency_s = 0.0
        label(run, srv, "--max_label", 40)
        for k in before:
            assert srv.requests[k] == 1, k  # a finished call is never asked again
        assert len({(r["sha256"], r["pass"]) for r in ledger(run) if r["status"] == "ok"}) == 80
        assert sum(srv.requests.values()) <= 80 + 3
    assert read_json(run / "label_summary.json")["accepted"] == 40


def test_truncated_last_line_tolerated(run):
    with LoopbackTeacher(truth(run), CLASSES) as srv:
        label(run, srv, "--max_label", 5)
        text = (run / "labels.jsonl").read_text()
        lines = text.splitlines(keepends=True)
        (run / "labels.jsonl").write_text("".join(lines[:-1]) + lines[-1][:40])  # torn write
        label(run, srv, "--max_label", 5)
        assert sum(srv.requests.values()) == 11  # only the torn record is asked again
    s = read_json(run / "label_summary.json")
    assert s["accepted"] == 5 and s["ledger_bad_lines"] == 1
    good = [line for line in (run / "labels.jsonl").read_text().splitlines() if line.startswith("{") and line.endswith("}")]
    assert len(good) == 10


def test_budget_stop_then_resume_with_higher_budget(run):
    with LoopbackTeacher(truth(run), CLASSES, cost=0.001) as srv:
        with pytest.raises(SystemExit) as stop:  # a budget stop exits 5, naming the budget
            label(run, srv, "--max_label", 20, "--max_usd", 0.0105, "--usd_per_call", 0.001)
        assert stop.value.code == 5
        s = read_json(run / "label_summary.json")
        assert s["budget_stopped"] and s["cost_usd"] <= 0.0105 + 1e-9 and s["calls"] == 10
        assert s["failed"] > 0
        label(run, srv, "--max_label", 20, "--max_usd", 1.0, "--usd_per_call", 0.001)
        assert all(v == 1 for v in srv.requests.values()) and len(srv.requests) == 40
    s = read_json(run / "label_summary.json")
    assert not s["budget_stopped"] and s["accepted"] == 20 and s["cost_usd"] == pytest.approx(0.040)


def test_dry_run_calls_nothing(run, capsys):
    with LoopbackTeacher(truth(run), CLASSES) as srv:
        label(run, srv, "--max_label", 15, "--dry_run", "--usd_per_call", 0.01)
        assert sum(srv.requests.values()) == 0
    out = capsys.readouterr().out
    assert "30-30 calls" in out and "$0.3000" in out
    assert not (run / "review_labels.csv").exists()


def test_401_stops_the_run(run, capsys):
    with LoopbackTeacher(truth(run), CLASSES) as srv:
        srv.script = [{"status": 401}] * 1000
        with pytest.raises(SystemExit) as e:
            label(run, srv, "--max_label", 30)
        assert e.value.code == 3
        assert sum(srv.requests.values()) <= 4  # only the calls already in flight, not 30 images
    err = capsys.readouterr().err
    assert "401" in err and "rejected" in err and KEY not in err
    assert read_json(run / "label_summary.json")["accepted"] == 0


def test_missing_key_exits_2_naming_the_fix(run, monkeypatch, capsys):
    monkeypatch.delenv("OPENROUTER_API_KEY")
    monkeypatch.chdir(run)  # no .env here
    with pytest.raises(SystemExit) as e:
        run_cli("--step", "label", "--out_dir", run, "--data_root", run.parent / "data")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "OPENROUTER_API_KEY" in err and ".env" in err and "--teacher oracle" in err
    assert not (run / "labels.jsonl").exists()


def test_gold_gate_stops_before_the_rest(run, capsys):
    wrong = {sha: CLASSES[(CLASSES.index(lab) + 1) % 5] for sha, lab in truth(run).items()}
    with LoopbackTeacher(wrong, CLASSES) as srv:
        with pytest.raises(SystemExit) as e:
            label(run, srv, "--max_label", 30, "--gold_n", 5, "--min_gold_acc", 0.8)
        assert e.value.code == 4
        assert len({sha for sha, _ in srv.requests}) == 5  # only the gold items were paid for
    err = capsys.readouterr().err
    assert "gold" in err and "->" in err
    s = read_json(run / "label_summary.json")
    assert s["gold_accuracy"] == 0.0 and s["gold"]["n"] == 5


def test_gold_csv_counts_within_sample(run):
    rows = [r for r in read_csv(run / "manifest.csv") if r["split"] == "train"][:4]
    gold = run.parent / "gold.csv"
    gold.write_text("path,label\n" + "".join(f"{r['path']},{r['label']}\n" for r in rows))
    with LoopbackTeacher(truth(run), CLASSES) as srv:
        label(run, srv, "--max_label", 10, "--gold_csv", gold)
    s = read_json(run / "label_summary.json")
    assert s["gold_accuracy"] == 1.0 and s["requested_images"] == 10
    assert {r["path"] for r in rows} <= {r["path"] for r in read_csv(run / "review_labels.csv")}


def test_human_edits_kept_across_reruns(run):
    with LoopbackTeacher(truth(run), CLASSES) as srv:
        label(run, srv, "--max_label", 8)
        rows = read_csv(run / "review_labels.csv")
        rows[0]["label_final"] = "pear" if rows[0]["llm_label"] != "pear" else "apple"
        edited = rows[0]["label_final"]
        import csv
        with open(run / "review_labels.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        label(run, srv, "--max_label", 8)
    rows = read_csv(run / "review_labels.csv")
    assert rows[0]["label_final"] == edited
    tl = training_labels(rows, CLASSES, "llm")
    assert (rows[0]["path"], edited, "human") in tl and sum(s == "human" for _, _, s in tl) == 1


def test_adaptive_second_pass_saves_calls(run):
    with LoopbackTeacher(truth(run), CLASSES, confidence=0.95) as srv:
        label(run, srv, "--max_label", 40, "--second_pass", "adaptive", "--adaptive_thresh", 0.9, "--audit_frac", 0.25)
    s = read_json(run / "label_summary.json")
    assert s["calls_pass1"] == 40 and 0 < s["calls_pass2"] < 30  # only the audit fraction got a second pass
    assert s["accepted"] == 40


def test_key_never_written_under_out(run):
    with LoopbackTeacher(truth(run), CLASSES) as srv:
        srv.script = [{"status": 503}, {"status": 400, "body": {"error": {"message": "bad"}}}]
        label(run, srv, "--max_label", 5, "--log_level", "DEBUG")
    for p in run.rglob("*"):
        if p.is_file():
            assert KEY.encode() not in p.read_bytes(), p

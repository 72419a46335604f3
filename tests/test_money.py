"""The money path against a real HTTP teacher on 127.0.0.1: two runs on one folder, a budget under a
price 20x the estimate, Ctrl-C and SIGTERM to the process group, a dead endpoint, ledger keys that
cover the question, and one LLM-only baseline."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fakes import KEY, ledger_records, run_cli, truth_by_sha
from flywheel.io import read_csv, read_json
from loopback import LoopbackTeacher

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["apple", "mushroom", "orange", "pear", "sweet_pepper"]


truth = truth_by_sha


def label(run, url, *extra):
    return run_cli("--step", "label", "--out_dir", run, "--data_root", run.parent / "data", "--llm_base_url", url,
                   "--llm_model", "test/model", "--max_workers", 4, *ALWAYS, *extra)


# the money tests count both passes of every image: pinned to the rule that always asks both
ALWAYS = ["--second_pass", "always"]


def label_cmd(run, url, *extra):
    return [sys.executable, str(ROOT / "cifar_distill.py"), "--step", "label", "--out_dir", str(run),
            "--data_root", str(run.parent / "data"), "--llm_base_url", url, "--llm_model", "test/model",
            *ALWAYS, *map(str, extra)]


ledger = ledger_records


def wait_for(cond, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- two runs, one folder

def test_second_run_on_the_same_folder_is_refused_naming_the_holder(run):
    # once A has started paying, every answer takes 5 s: A then holds the folder for over 3 minutes (118 calls, 3 in
    # flight), however slowly B starts on a busy machine (its imports took 3-6 s on an idle 2-core one, more beside
    # a bench); when B is done, answers are instant again and A finishes
    with LoopbackTeacher(truth(run), CLASSES, latency_s=0.25) as srv:
        env = {**os.environ, "OPENROUTER_API_KEY": KEY}
        a = subprocess.Popen(label_cmd(run, srv.url, "--max_label", 60, "--max_workers", 3), cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert wait_for(lambda: (run / "labels.jsonl").exists() and len(ledger(run)) >= 2)
        srv.latency_s = 5.0
        b = subprocess.run(label_cmd(run, srv.url, "--max_label", 60, "--max_workers", 3), cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        srv.latency_s = 0.0
        assert a.wait(timeout=60) == 0
        assert b.returncode != 0 and str(a.pid) in b.stderr and "--out_dir" in b.stderr, b.stderr
        assert "Traceback" not in b.stderr and len(b.stderr.strip().splitlines()) == 1
        assert max(srv.requests.values()) == 1  # nothing was paid twice
    assert sum(1 for _ in ledger(run)) == 120
    # the lock dies with its holder: a later run on the folder works
    with LoopbackTeacher(truth(run), CLASSES) as srv:
        label(run, srv.url, "--max_label", 60)
        assert sum(srv.requests.values()) == 0


# ----------------------------------------------------------------------------- the budget

def test_budget_caps_real_spend_when_the_estimate_is_20x_low(run):
    price = 0.002
    with LoopbackTeacher(truth(run), CLASSES, cost=price) as srv:
        with pytest.raises(SystemExit) as stop:  # a budget stop exits 5
            label(run, srv.url, "--max_label", 20, "--max_workers", 1, "--usd_per_call", price / 20, "--max_usd", 0.005)
        assert stop.value.code == 5
    spent = read_json(run / "label_summary.json")["cost_usd"]
    assert 0 < spent <= 0.005 + 1e-12  # one worker: nothing in flight to overshoot with
    # the next run knows the price from the ledger: raising the cap by 1.5 calls buys exactly one more
    with LoopbackTeacher(truth(run), CLASSES, cost=price) as srv:
        with pytest.raises(SystemExit):  # stopped again, one call later
            label(run, srv.url, "--max_label", 20, "--max_workers", 1, "--usd_per_call", price / 20,
                  "--max_usd", spent + 1.5 * price)
        assert sum(srv.requests.values()) == 1


def test_budget_overshoot_is_at_most_the_calls_in_flight(run):
    price, workers, cap = 0.002, 4, 0.01
    with LoopbackTeacher(truth(run), CLASSES, cost=price, latency_s=0.05) as srv:
        with pytest.raises(SystemExit):
            label(run, srv.url, "--max_label", 40, "--max_workers", workers, "--usd_per_call", price / 20, "--max_usd", cap)
    s = read_json(run / "label_summary.json")
    assert s["budget_stopped"] and s["cost_usd"] <= cap + workers * price + 1e-12


# ----------------------------------------------------------------------------- Ctrl-C, SIGTERM

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_the_process_group_stops_spending_at_once(run, sig):
    # 1 s per answer: 100 calls on 3 workers take ~33 s, so a test process starved for seconds on a loaded
    # machine still signals a run in progress (at 0.2 s the run once finished first, in 7 s)
    with LoopbackTeacher(truth(run), CLASSES, latency_s=1.0) as srv:
        env = {**os.environ, "OPENROUTER_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}
        p = subprocess.Popen(label_cmd(run, srv.url, "--max_label", 50, "--max_workers", 3), cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        assert wait_for(lambda: (run / "labels.jsonl").exists() and len(ledger(run)) >= 6)
        os.killpg(p.pid, sig)  # as a terminal sends Ctrl-C: to the whole process group
        out, err = p.communicate(timeout=30)
        sent = sum(srv.requests.values())
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("interrupted:")]
    recs = ledger(run)
    assert sent == len(recs) < 100  # calls in flight landed in the ledger; queued images were never sent
    s = read_json(run / "label_summary.json")  # rewritten from what was paid
    assert s["interrupted"] and s["calls"] == len(recs)
    answered = {r["path"] for r in recs if r["pass"] == 2}
    rows = read_csv(run / "review_labels.csv")
    assert {r["path"] for r in rows if r["status"] == "accepted"} == answered


def test_worker_exception_stops_new_calls(run, monkeypatch):
    from flywheel.ledger import Ledger
    real_append, n = Ledger.append, {"calls": 0}

    def boom(self, rec):
        n["calls"] += 1
        if n["calls"] == 3:
            raise RuntimeError("disk full (simulated)")
        return real_append(self, rec)
    monkeypatch.setattr(Ledger, "append", boom)
    with LoopbackTeacher(truth(run), CLASSES, latency_s=0.05) as srv:
        with pytest.raises(RuntimeError, match="disk full"):
            label(run, srv.url, "--max_label", 40, "--max_workers", 2)
        assert sum(srv.requests.values()) <= 3 + 2 * 2 * 2  # the window in flight, not all 80 calls


# ----------------------------------------------------------------------------- a dead endpoint

def test_dead_endpoint_fails_fast_naming_the_url_and_keeps_what_was_paid(run):
    with LoopbackTeacher(truth(run), CLASSES) as srv:
        label(run, srv.url, "--max_label", 5)
    dead = f"http://127.0.0.1:{free_port()}/v1"
    t0 = time.time()
    p = subprocess.run(label_cmd(run, dead, "--max_label", 40, "--max_workers", 2), cwd=ROOT,
                       env={**os.environ, "OPENROUTER_API_KEY": KEY}, capture_output=True, text=True, timeout=60)
    assert time.time() - t0 < 30
    assert p.returncode == 3 and dead in p.stderr and "ConnectError" in p.stderr and "Traceback" not in p.stderr
    assert KEY not in p.stderr
    rows = read_csv(run / "review_labels.csv")
    assert sum(r["status"] == "accepted" for r in rows) == 5  # the 5 paid answers are still there


# ----------------------------------------------------------------------------- the ledger key

def test_changed_classes_never_reuse_another_questions_answers(run):
    with LoopbackTeacher(truth(run), CLASSES) as srv:
        label(run, srv.url, "--max_label", 10)
        assert sum(srv.requests.values()) == 20
    # the same images asked about two classes: a different question, so asked again
    run_cli("--step", "prep", "--data_root", run.parent / "data", "--out_dir", run, "--img_size", 32,
            "--classes", "apple,orange")
    two = {sha: lab for sha, lab in truth(run).items()}
    with LoopbackTeacher(two, ["apple", "orange"]) as srv:
        label(run, srv.url, "--max_label", 10)
        assert sum(srv.requests.values()) == 20
    assert {r["label_final"] for r in read_csv(run / "review_labels.csv") if r["label_final"]} <= {"apple", "orange"}
    run_cli("--step", "train", "--out_dir", run, "--data_root", run.parent / "data", "--weights", "none",
            "--epochs", 1, "--batch_size", 8)


def test_second_temperature_change_asks_pass_2_again_only(run):
    with LoopbackTeacher(truth(run), CLASSES) as srv:
        label(run, srv.url, "--max_label", 6)
        label(run, srv.url, "--max_label", 6, "--second_temp", 0.5)
        passes = {}
        for (sha, p), n in srv.requests.items():
            passes[p] = passes.get(p, 0) + n
    assert passes == {1: 6, 2: 12}


def test_v1_ledger_records_are_rekeyed_not_repaid(run):
    with LoopbackTeacher(truth(run), CLASSES) as srv:
        label(run, srv.url, "--max_label", 10)
    # rewrite the ledger as the first release wrote it: key (sha, pass, model, "v1"), no question field
    old = []
    for r in ledger(run):
        r = {k: v for k, v in r.items() if k != "question"}
        r["key"] = f"{r['sha256']}|{r['pass']}|{r['model']}|v1"
        old.append(json.dumps(r))
    (run / "labels.jsonl").write_text("\n".join(old) + "\n")
    with LoopbackTeacher(truth(run), CLASSES) as srv:
        label(run, srv.url, "--max_label", 10)
        assert sum(srv.requests.values()) == 0
    assert read_json(run / "label_summary.json")["accepted"] == 10


def test_label_summary_counts_only_the_current_model(run):
    with LoopbackTeacher(truth(run), CLASSES) as srv:
        label(run, srv.url, "--max_label", 8)
        label(run, srv.url, "--max_label", 8, "--llm_model", "other/model")
    s = read_json(run / "label_summary.json")
    assert s["model"] == "other/model" and s["calls"] == 16 and len(ledger(run)) == 32


# ----------------------------------------------------------------------------- one baseline

def test_one_llm_only_baseline_everywhere(exported_run):
    from flywheel.costs import BREAKEVEN_DEFAULTS, LLM_ONLY_CALLS_PER_ITEM, breakeven_report
    c = read_json(exported_run / "artifacts" / "cascade.json")
    assert LLM_ONLY_CALLS_PER_ITEM == 1 == BREAKEVEN_DEFAULTS["llm_calls_per_item"]
    assert c["inputs"]["calls_per_item_llm_only"] == 1
    for split in ("test", "pool"):
        assert c[split]["llm_only_calls"] == c[split]["n"]
    per_call = read_json(exported_run / "label_summary.json")["mean_cost_per_call_usd"]
    r = breakeven_report([1000], root=str(exported_run), student_cost_per_1k=0.0)
    assert r["inputs"]["llm_cost_per_item"] == pytest.approx(per_call)

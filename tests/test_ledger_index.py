"""labels.jsonl stays the record; labels.index.sqlite is derived from it: answers survive a reopen, a
lost index row, a deleted index, a replaced ledger and a torn line, and the index never holds a raw reply."""
import json
import threading

import pytest

from flywheel.ledger import Ledger, index_path


def call(i, status="ok", cost=0.001, label="pear"):
    return {"key": f"sha{i}|1|m|q", "sha256": f"sha{i}", "pass": 1, "model": "m", "status": status, "label": label,
            "confidence": 0.9, "cost_usd": cost, "latency_s": 0.5, "purpose": "label",
            "raw": f'{{"label": "{label}", "why": "SECRET-RAW-{i}"}}'}


def test_answers_survive_a_reopen_and_stay_greppable(tmp_path):
    led = Ledger(tmp_path / "labels.jsonl")
    for i in range(5):
        led.append(call(i))
    led.append(call(5, status="invalid", cost=0.002))
    led.close()
    led = Ledger(tmp_path / "labels.jsonl")
    assert led.ok("sha3|1|m|q")["label"] == "pear" and led.ok("sha5|1|m|q") is None
    assert led.count("sha5|1|m|q", "invalid") == 1 and len(led) == 6
    assert led.total_cost() == pytest.approx(0.007) and led.max_cost_per_call("m") == pytest.approx(0.002)
    assert led.paid_means("m") == (6, pytest.approx(0.007 / 6), pytest.approx(0.5))
    assert [r["key"] for r in led.calls(["sha1|1|m|q", "sha4|1|m|q"])] == ["sha1|1|m|q", "sha4|1|m|q"]
    led.close()
    lines = (tmp_path / "labels.jsonl").read_text().splitlines()
    assert len(lines) == 6 and "SECRET-RAW-2" in lines[2]  # the record a person reads has everything


def test_the_index_keeps_small_fields_never_raw_replies(tmp_path):
    led = Ledger(tmp_path / "labels.jsonl")
    for i in range(50):
        led.append(call(i))
    assert "raw" not in led.ok("sha1|1|m|q")
    led.close()
    assert b"SECRET-RAW" not in index_path(tmp_path / "labels.jsonl").read_bytes()


def test_a_line_whose_index_row_was_lost_is_indexed_on_the_next_open(tmp_path):
    """kill -9 between the JSONL line and its index row: the line is there, the row is not."""
    led = Ledger(tmp_path / "labels.jsonl")
    led.append(call(0))
    led.close()
    with open(tmp_path / "labels.jsonl", "a") as f:
        f.write(json.dumps(call(1)) + "\n")
    led = Ledger(tmp_path / "labels.jsonl")
    assert led.ok("sha1|1|m|q") is not None and len(led) == 2


@pytest.mark.parametrize("change", ["delete_index", "replace_ledger", "cut_ledger"])
def test_the_index_follows_the_ledger(tmp_path, change):
    path = tmp_path / "labels.jsonl"
    led = Ledger(path)
    for i in range(4):
        led.append(call(i))
    led.close()
    if change == "delete_index":
        index_path(path).unlink()
        want = {0, 1, 2, 3}
    elif change == "replace_ledger":
        path.write_text("".join(json.dumps(call(i, label="apple")) + "\n" for i in (7, 8)))
        want = {7, 8}
    else:  # a person cut the last two lines
        path.write_text("".join(path.read_text().splitlines(keepends=True)[:2]))
        want = {0, 1}
    led = Ledger(path)
    assert {i for i in range(10) if led.ok(f"sha{i}|1|m|q")} == want and len(led) == len(want)


def test_a_torn_last_line_is_skipped_and_counted(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps(call(0)) + "\n" + json.dumps(call(1))[:30])
    led = Ledger(path)
    assert led.ok("sha0|1|m|q") is not None and led.ok("sha1|1|m|q") is None and led.bad_lines == 1
    led.append(call(2))
    led.close()
    assert Ledger(path).ok("sha2|1|m|q") is not None


def test_threads_appending_at_once_are_all_indexed(tmp_path):
    led = Ledger(tmp_path / "labels.jsonl")
    threads = [threading.Thread(target=lambda k=k: [led.append(call(100 * k + i)) for i in range(50)]) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(led) == 400 and all(led.ok(f"sha{100 * k + 49}|1|m|q") for k in range(8))
    led.close()
    assert len(Ledger(tmp_path / "labels.jsonl")) == 400

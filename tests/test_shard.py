"""Labeling on several machines: --shard I/N labels disjoint parts into their own ledgers, --step merge
makes one ledger with no key answered twice, and the plain label step then writes the same labels an
unsharded run writes, without paying again."""
import shutil

import pytest

from fakes import ledger_records as ledger
from fakes import run_cli
from flywheel.io import read_csv, read_json

# both passes for every image: under the default label model each shard would fit its own rule on its part
ORACLE = ["--teacher", "oracle", "--max_label", 60, "--second_pass", "always"]


@pytest.fixture
def cli(run):
    """run_cli on a run folder whose images came from the fixture's data folder beside `run`."""
    return lambda out, *args: run_cli(*args, "--out_dir", out, "--data_root", run.parent / "data")


@pytest.mark.parametrize("bad", ["2", "a/b", "2/2", "-1/2", "0/0"])
def test_a_bad_shard_fails_before_any_work(cli, run, bad):
    with pytest.raises(SystemExit, match="--shard"):
        cli(run, "--step", "label", f"--shard={bad}", *ORACLE)
    assert not (run / "labels.jsonl").exists()


def test_shard_is_for_the_label_step_only(cli, run):
    with pytest.raises(SystemExit, match="--step label only"):
        cli(run, "--step", "cascade", "--shard", "0/2", *ORACLE)


def test_shards_merge_into_the_unsharded_labels_at_no_new_cost(cli, run, tmp_path):
    base = run
    whole, main = tmp_path / "whole", tmp_path / "main"
    for d in (whole, main):
        shutil.copytree(base, d)
    cli(whole, "--step", "label", *ORACLE)  # the control: one machine

    for i in range(2):  # two machines, each with its own copy of the prepped run
        m = tmp_path / f"machine{i}"
        shutil.copytree(base, m)
        cli(m, "--step", "label", "--shard", f"{i}/2", *ORACLE)
        assert not (m / "labels.jsonl").exists() and not (m / "review_labels.csv").exists()
        shutil.copy(m / f"labels.shard-{i}-of-2.jsonl", main)
    parts = [{r["sha256"] for r in ledger(tmp_path / f"machine{i}", f"labels.shard-{i}-of-2.jsonl")} for i in range(2)]
    assert parts[0] and parts[1] and not parts[0] & parts[1]  # disjoint parts, both non-empty

    cli(main, "--step", "merge", "--teacher", "oracle")
    merged = ledger(main)
    ok_keys = [r["key"] for r in merged if r["status"] == "ok"]
    assert len(ok_keys) == len(set(ok_keys)) == sum(len(ledger(tmp_path / f"machine{i}", f"labels.shard-{i}-of-2.jsonl"))
                                                    for i in range(2))
    assert all(r["merged_from"].startswith("labels.shard-") for r in merged)

    cli(main, "--step", "merge", "--teacher", "oracle")  # again: nothing new
    assert len(ledger(main)) == len(merged)

    cli(main, "--step", "label", *ORACLE)
    assert len(ledger(main)) == len(merged)  # every answer was paid for by a shard
    key = lambda rows: sorted((r["path"], r["llm_label"], r["status"]) for r in rows)  # noqa: E731
    assert key(read_csv(main / "review_labels.csv")) == key(read_csv(whole / "review_labels.csv"))
    assert read_json(main / "label_summary.json")["calls"] == read_json(whole / "label_summary.json")["calls"]


def test_an_answer_two_shards_both_hold_is_kept_once(cli, run, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(run, m)
    cli(m, "--step", "label", "--shard", "0/1", *ORACLE)
    shutil.copy(m / "labels.shard-0-of-1.jsonl", m / "labels.shard-0-of-2.jsonl")  # the same answers again
    cli(m, "--step", "merge", "--teacher", "oracle")
    ok_keys = [r["key"] for r in ledger(m) if r["status"] == "ok"]
    assert ok_keys and len(ok_keys) == len(set(ok_keys))
    assert read_json(m / "labels_merge.json").keys() == {"labels.shard-0-of-1.jsonl", "labels.shard-0-of-2.jsonl"}


def test_merge_without_shards_says_what_to_do(cli, run):
    with pytest.raises(SystemExit, match="--shard I/N on each machine"):
        cli(run, "--step", "merge", "--teacher", "oracle")

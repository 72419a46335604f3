"""Class changes without paying twice: --label_map old=new carries the ledger's answers to a merged class
list at no cost, with provenance; a person's rows follow; an added class asks again and the dry run says so."""
import json
import shutil

import pytest
from PIL import Image

from fakes import make_image_folder, run_cli
from flywheel.io import read_csv, read_json

LABEL = ["--step", "label", "--teacher", "oracle", "--oracle_noise", 0, "--max_label", 12, "--second_pass", "always"]


def merged(src, dst, into, olds, extra=()):
    """A copy of image folder src with the classes `olds` moved into one folder `into` (and empty `extra` classes)."""
    shutil.copytree(src, dst)
    for split in ("train", "test"):
        (dst / split / into).mkdir()
        for old in olds:
            for f in (dst / split / old).iterdir():
                f.rename(dst / split / into / f.name)
            (dst / split / old).rmdir()
    for split, c in ((s, c) for s in ("train", "test") for c in extra):
        (dst / split / c).mkdir()
        for i in range(2):
            Image.new("RGB", (20, 20 + i), (200, 200, 20 + 100 * (split == "test"))).save(dst / split / c / f"{c}{i}.png")
    return dst


def ledger(run):
    return [json.loads(line) for line in (run / "labels.jsonl").read_text().splitlines()]


def test_a_merge_carries_every_answer_and_a_persons_row(tmp_path, capsys):
    data, run = make_image_folder(tmp_path / "data", n_train=6, n_test=2), tmp_path / "run"
    common = ["--dataset", "folder", "--out_dir", run]
    run_cli("--step", "prep", *common, "--data_root", data, "--img_size", 32)
    run_cli(*LABEL, *common, "--data_root", data)
    paid = ledger(run)
    assert len(paid) == 24  # 12 images, both passes
    rows = read_csv(run / "review_labels.csv")
    edited = next(r for r in rows if r["llm_label"] == "red")
    edited.update(label_final="green")  # a person's correction, under the old classes
    from flywheel.io import write_csv
    write_csv(run / "review_labels.csv", list(rows[0]), rows)

    data2 = merged(data, tmp_path / "data2", "warm", ["red", "green"])
    run_cli("--step", "prep", *common, "--data_root", data2, "--img_size", 32)  # classes now blue, warm
    with pytest.raises(SystemExit, match="did you mean red"):
        run_cli(*LABEL, *common, "--data_root", data2, "--label_map", "rde=warm,green=warm")
    capsys.readouterr()
    run_cli(*LABEL, *common, "--data_root", data2, "--label_map", "red=warm,green=warm", "--dry_run")
    out = capsys.readouterr().out
    assert "24 earlier answer(s) to ['blue', 'green', 'red'] carry over" in out and "0-0 calls still needed" in out
    assert len(ledger(run)) == 24  # a dry run writes nothing

    run_cli(*LABEL, *common, "--data_root", data2, "--label_map", "red=warm,green=warm")
    recs = ledger(run)
    new = recs[24:]
    assert len(new) == 24 and all(r["purpose"] == "mapped" and r["cost_usd"] == 0.0 for r in new)
    assert {r["label"] for r in new} == {"blue", "warm"}
    assert {r["mapped"]["from_key"] for r in new} == {r["key"] for r in paid}  # each earlier answer, once
    assert all(r["mapped"]["map"] == "red=warm,green=warm" for r in new)
    summary = read_json(run / "label_summary.json")
    assert summary["calls"] == 0 and summary["answers_carried"] == 24 and summary["accepted"] == 12
    person = next(r for r in read_csv(run / "review_labels.csv") if r["path"].endswith(edited["path"].split("/")[-1]))
    assert person["label_final"] == "warm" and "/warm/" in person["path"]  # followed its image to the new folder

    run_cli(*LABEL, *common, "--data_root", data2)  # the flag dropped: the same images, nothing asked
    assert len(ledger(run)) == 48 and read_json(run / "label_summary.json")["accepted"] == 12

    data3 = merged(data, tmp_path / "data3", "warm", ["red", "green"], extra=["yellow"])
    run_cli("--step", "prep", *common, "--data_root", data3, "--img_size", 32)  # a class added: a new question
    capsys.readouterr()
    run_cli(*LABEL, *common, "--data_root", data3, "--label_map", "red=warm,green=warm", "--dry_run")
    out = capsys.readouterr().out
    assert "0 earlier answer(s)" in out and "24-24 calls still needed" in out

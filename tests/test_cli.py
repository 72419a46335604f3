"""A command line that forgives and explains: no abbreviations, the closest flag, step or class for a
typo in one line, exit codes as the README's table says, a budget stop that exits non-zero."""
import re
from pathlib import Path

import pytest

import cifar_distill as C
from fakes import run_cli


def fails(capsys, *args):
    with pytest.raises(SystemExit) as e:
        run_cli(*args)
    err = capsys.readouterr().err.strip()
    if isinstance(e.value.code, str):  # SystemExit("error: ...") prints its message and exits 1
        return 1, e.value.code
    return e.value.code, err


@pytest.mark.parametrize("args,hint", [
    (["--max_per_clas", 5], "did you mean --max_per_class?"),   # an abbreviation is not taken
    (["--img_siz", 48], "did you mean --img_size?"),
    (["--epohcs", 3], "did you mean --epochs?"),
    (["--step", "lable"], "did you mean label?"),
    (["--teacher", "orcale"], "did you mean oracle?"),
])
def test_a_typo_gets_one_line_with_the_closest_valid_value(capsys, args, hint):
    code, err = fails(capsys, *args)
    assert code == C.cli.EXIT_USAGE == 1 and hint in err and len(err.splitlines()) == 1, err


def test_a_class_typo_names_the_class(capsys, prepped12):
    code, err = fails(capsys, "--step", "label", "--dry_run", "--data_root",
                      prepped12 / "data", "--out_dir", prepped12 / "run", "--classes", "apple,Pear")
    assert code == 1 and "did you mean pear?" in err, err


def test_help_groups_flags_by_step_with_the_newcomers_first(capsys):
    with pytest.raises(SystemExit):
        run_cli("--help")
    out = capsys.readouterr().out
    heads = [h for h in re.findall(r"^(\S[^\n]*):$", out, re.M) if h not in ("options", "optional arguments")]
    assert heads[0] == "start here" and {"prep", "train", "serve"} <= set(heads), heads
    start = out[out.index("start here:"):out.index(heads[1] + ":")]
    assert all(f"--{n}" in start for n in C.START_HERE) and "--demo" in start
    for name, (_, default, _) in C.OPTIONS.items():  # every help ends with its default
        assert re.search(rf"--{name}\b.*?\(default: [^)]*\)", out, re.S), name


def test_exit_codes_match_the_readme_table():
    table = dict(re.findall(r"^\| (\d+) \| ([^|]+) \|$", (Path(C.__file__).parent / "README.md").read_text(), re.M))
    assert "bad flag" in table["1"] and "OPENROUTER_API_KEY" in table[str(C.EXIT_NO_KEY)]
    assert "401" in table[str(C.EXIT_TEACHER_FATAL)] and "gold" in table[str(C.EXIT_GOLD_GATE)]
    assert "--max_usd" in table[str(C.EXIT_BUDGET)] and "interrupted" in table[str(C.EXIT_INTERRUPTED)]


def test_a_budget_stop_exits_non_zero_naming_the_budget(capsys, run):
    code, err = fails(capsys, "--step", "label", "--out_dir", run, "--teacher", "oracle", "--max_usd", 0,
                      "--max_label", 20)
    assert code == C.EXIT_BUDGET and "--max_usd 0" in err and "budget" in err, err
    code, err = fails(capsys, "--step", "train", "--out_dir", run, "--weights", "none")  # nothing was accepted


def test_dry_run_warns_over_budget_and_a_full_sample_warns_of_no_pool(capsys, caplog, run):
    run_cli("--step", "label", "--dry_run", "--out_dir", run, "--teacher", "oracle", "--max_usd", 0.001)
    err = capsys.readouterr().err
    assert "over --max_usd 0.001" in err, err
    run_cli("--step", "label", "--dry_run", "--out_dir", run, "--teacher", "oracle", "--max_label", 10_000)
    assert any("no pool will be left" in r.getMessage() for r in caplog.records)

"""Report and datacard: numbers equal the JSON artifacts, simulated sources are flagged, and every
command quoted in README.md and blog.md parses with the real CLIs."""
import re
import shlex
from pathlib import Path

import pytest

import cifar_distill
import cost_breakeven
import plot_confusion
import simple_speed_test
from fakes import run_cli
from flywheel.io import read_json

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reported(exported_run):
    run_cli("--step", "report", "--out_dir", exported_run, "--data_root", exported_run.parent / "data", "--teacher", "oracle")
    return exported_run


def table_value(md, section, key):
    """The value cell of `| key | value |` inside the section whose heading starts with `section`."""
    body = md.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    m = re.search(rf"^\| {re.escape(key)} \| ([^|]+) \|", body, re.M)
    assert m, (section, key)
    return m.group(1).strip()


def test_report_numbers_match_artifacts(reported):
    md = (reported / "report.md").read_text()
    ev = read_json(reported / "artifacts" / "eval.json")
    ls = read_json(reported / "label_summary.json")
    cas = read_json(reported / "artifacts" / "cascade.json")
    assert float(table_value(md, "Student", "accuracy")) == pytest.approx(ev["accuracy"], abs=5e-5)
    assert float(table_value(md, "Student", "macro-F1")) == pytest.approx(ev["macro_f1"], abs=5e-5)
    assert float(table_value(md, "Student", "ECE after")) == pytest.approx(ev["ece_after"], abs=5e-5)
    assert int(table_value(md, "Student", "n_test")) == ev["n_test"]
    assert int(table_value(md, "Teacher", "paid calls")) == ls["calls"]
    assert int(table_value(md, "Teacher", "accepted")) == ls["accepted"]
    assert float(table_value(md, "Teacher", "spend").split()[0].lstrip("$")) == pytest.approx(ls["cost_usd"], abs=5e-5)
    row = re.search(r"^\| test \| (\d+) \| ([\d.]+)% \| ([\d.]+)% \| ([\d.]+)% \| ([\d.]+) \| (\d+) \| (\d+) \| \$([\d.]+) \|", md, re.M)
    assert row, "cascade test row"
    n, stu, llm, hum, acc, calls, only, cost = row.groups()
    t = cas["test"]
    assert int(n) == t["n"] and int(calls) == t["llm_calls"] and int(only) == t["llm_only_calls"]
    assert float(stu) == pytest.approx(100 * t["routes"]["student"], abs=0.05)
    assert float(acc) == pytest.approx(t["accuracy"], abs=5e-5) and float(cost) == pytest.approx(t["cost_usd"], abs=5e-5)
    rc = cas["rule_comparison"]
    for name in ("student_then_llm", "combined"):
        cells = re.search(rf"^\| {'student, then' if name == 'student_then_llm' else 'combined evidence'}[^|]* \| (\d+) \| (\d+) \|",
                          md, re.M)
        assert cells, name
        assert [int(c) for c in cells.groups()] == [rc[name]["wrong_without_person"], rc[name]["to_person"]]
    for png in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (reported / png).exists(), png


def test_report_flags_simulated_sources_at_the_top(reported):
    head = (reported / "report.md").read_text().split("## Config")[0]
    assert "SIMULATED" in head and "oracle" in head and "simulate" in head.lower()
    card = (reported / "datacard.md").read_text()
    assert "SIMULATED" in card and "oracle" in card and "apple" in card and "Known limitations" in card


def commands_in(md_file, section=None):
    text = (ROOT / md_file).read_text()
    if section:
        text = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    cmds = []
    for b in blocks:
        b = b.replace("\\\n", " ")
        for line in b.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("uv run") and ".py" in line and not line.startswith(("uv run python", "uv run pytest")):
                cmds.append(line)
    return cmds


PARSERS = {"cifar_distill.py": cifar_distill.build_parser, "cost_breakeven.py": cost_breakeven.build_parser,
           "simple_speed_test.py": simple_speed_test.build_parser, "plot_confusion.py": plot_confusion.build_parser}


def parse(cmd):
    argv = shlex.split(cmd)[2:]  # drop "uv run"
    if argv[0] == "torchrun":  # torchrun's own options come before the script
        argv = argv[next(i for i, a in enumerate(argv) if a.endswith(".py")):]
    script = Path(argv[0]).name
    assert script in PARSERS, f"unknown script in {cmd!r}"
    PARSERS[script]().parse_args(argv[1:])  # argparse exits on any flag it does not know


@pytest.mark.parametrize("md,section", [("README.md", None), ("blog.md", "Reproduce")])
def test_quoted_commands_parse_with_the_real_cli(md, section):
    cmds = commands_in(md, section)
    assert len(cmds) >= 5, cmds
    for cmd in cmds:
        parse(cmd)


def test_script_docstring_commands_parse():
    for line in cifar_distill.__doc__.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line.startswith("uv run cifar_distill.py"):
            parse(line)


def test_every_flag_help_ends_with_default():
    for build in PARSERS.values():
        for action in build()._actions:
            if action.option_strings and action.dest != "help":
                assert action.help.rstrip().endswith(")") and "(default: " in action.help, action.dest


def test_bad_flag_values_fail_before_work(tmp_path):
    for argv, flag in ((["--conf_thresh", "1.5"], "--conf_thresh"), (["--epochs", "0"], "--epochs"),
                       (["--weights", "nope.pt"], "--weights"), (["--val_frac", "0.7"], "--val_frac"),
                       (["--llm_base_url", "ftp://x"], "--llm_base_url"), (["--contest_below", "1.5"], "--contest_below")):
        with pytest.raises(SystemExit, match=flag):
            run_cli("--out_dir", tmp_path / "r", "--teacher", "oracle", *argv)
        assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit):
        run_cli("--step", "nonsense")

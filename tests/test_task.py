"""The task spec (--task task.toml): the prompt comes from it, few-shot images go with every question, its
digest keys the ledger (an unchanged spec never pays twice, an edited one asks again), later steps reuse the
recorded spec, the dry run shows the prompt, the datacard prints it, and a bad spec fails before any call."""
import pytest

from fakes import ledger_records, run_cli, truth_by_sha
from flywheel.io import read_json
from loopback import LoopbackTeacher

CLASSES = ["apple", "mushroom", "orange", "pear", "sweet_pepper"]
DEFS = {"apple": "a round fruit with a stem dimple", "mushroom": "a cap on a stem", "orange": "a round citrus fruit",
        "pear": "a fruit that narrows toward the stem", "sweet_pepper": "a glossy lobed vegetable"}


def spec(tmp_path, description="Classify product photos by fruit or vegetable.", examples=True, defs=DEFS):
    from PIL import Image
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "apple1.png")
    lines = [f'description = "{description}"', "[classes]", *[f'{c} = "{d}"' for c, d in defs.items()]]
    if examples:
        lines += ["[examples]", 'apple = ["apple1.png"]']
    (tmp_path / "task.toml").write_text("\n".join(lines) + "\n[settings]\ntarget_label_precision = 0.95\n")
    return tmp_path / "task.toml"


def label(run, url, *extra):
    return run_cli("--step", "label", "--out_dir", run, "--data_root", run.parent / "data", "--llm_base_url", url,
                   "--llm_model", "test/model", "--max_workers", 4, "--max_label", 10, "--second_pass", "always", *extra)


def user_content(body):
    return next(m["content"] for m in body["messages"] if m["role"] == "user")


def test_the_prompt_and_the_ledger_key_come_from_the_spec(run, tmp_path, capsys):
    task = spec(tmp_path)
    run_cli("--step", "label", "--out_dir", run, "--task", task, "--max_label", 10, "--dry_run")
    out = capsys.readouterr().out
    assert "Classify product photos by fruit or vegetable." in out and f"- pear: {DEFS['pear']}" in out
    assert "1 example image(s)" in out and "calls still needed" in out
    with LoopbackTeacher(truth_by_sha(run), CLASSES) as srv:
        srv.keep_messages = True
        label(run, srv.url, "--task", task)
        asked = sum(srv.requests.values())
        parts = user_content(srv.messages[0])
        assert "Classify product photos" in parts[0]["text"] and f"- apple: {DEFS['apple']}" in parts[0]["text"]
        assert [p["type"] for p in parts] == ["text", "text", "image_url", "text", "image_url"]  # example, then the photo
        assert parts[1]["text"] == "Example of apple:"
        label(run, srv.url, "--task", task, "--force")  # the same spec: nothing asked again
        assert sum(srv.requests.values()) == asked
        run_cli("--step", "label", "--out_dir", run, "--data_root", run.parent / "data", "--llm_base_url", srv.url,
                "--llm_model", "test/model", "--max_label", 10, "--second_pass", "always", "--force")  # recorded spec
        assert sum(srv.requests.values()) == asked
        spec(tmp_path, description="Classify grocery photos.")  # an edited spec is another question
        label(run, srv.url, "--task", task)
        assert sum(srv.requests.values()) == 2 * asked
    recs = ledger_records(run)
    assert not {r["key"] for r in recs[:asked]} & {r["key"] for r in recs[asked:]}  # the edited spec: other keys
    assert read_json(run / "task.json")["description"] == "Classify grocery photos."
    from flywheel.report import task_text
    from flywheel.run import Paths
    assert "Classify grocery photos." in task_text(Paths(run)) and DEFS["pear"] in task_text(Paths(run))


@pytest.mark.parametrize("bad, says", [
    ("missing", "does not exist"),
    ("not toml", "is not valid TOML"),
    ("no description", "needs description"),
    ("a class short", "missing ['sweet_pepper']"),
])
def test_a_bad_spec_fails_before_any_call_naming_the_problem(run, tmp_path, capsys, bad, says):
    task = spec(tmp_path, examples=False)
    if bad == "missing":
        task = tmp_path / "nope.toml"
    elif bad == "not toml":
        task.write_text("description = \n")
    elif bad == "no description":
        task.write_text("[classes]\napple = 'x'\npear = 'y'\n")
    else:
        spec(tmp_path, examples=False, defs={c: d for c, d in DEFS.items() if c != "sweet_pepper"})
    with LoopbackTeacher(truth_by_sha(run), CLASSES) as srv:
        with pytest.raises(SystemExit) as e:
            label(run, srv.url, "--task", task)
        assert not srv.requests
    assert says in str(e.value.code) and "--task" in str(e.value.code)

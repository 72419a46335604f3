"""Less noise: no library warnings from export, no empty progress bars, money with its sign in front, a
reliability diagram that shows how few images a bin holds, and legends beside the data, never over it."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_export_prints_no_library_warnings(exported_run, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(exported_run, run)
    p = subprocess.run([sys.executable, str(ROOT / "cifar_distill.py"), "--step", "export", "--out_dir",
                        str(run), "--teacher", "oracle", "--force"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "Warning" not in p.stderr, p.stderr


def test_nothing_to_ask_draws_no_bar(capsys):
    from flywheel.labeling import Budget, label_items
    assert label_items([], None, None, None, Budget(1.0, 0.0, 0.0002), "flywheel", 2, "relabel") == {}
    assert "0img" not in capsys.readouterr().err


def plotted(monkeypatch, draw):
    """The matplotlib figure a flywheel.plots function draws, drawn, before it is saved and closed."""
    import flywheel.plots as plots
    got = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: got.setdefault("fig", fig))
    draw(plots)
    fig = got["fig"]
    fig.canvas.draw()
    return fig


EV = {"temperature": 1.5, "ece_before": 0.1, "ece_after": 0.05, "classes": ["a", "b"], "macro_f1": 0.5,
      "report": {"a": {"f1": 0.4}, "b": {"f1": 0.6}},
      "reliability": {k: [{"lo": 0.6, "hi": 0.67, "count": 2, "conf": 0.63, "acc": 0.5},
                          {"lo": 0.93, "hi": 1.0, "count": 31, "conf": 0.97, "acc": 1.0}] for k in ("before", "after")}}
CAS = {"tau": 0.8, "test": {"escalation_rate": 0.3, "accuracy": 0.9},
       "sweep": [{"escalation_rate": e / 10, "accuracy": 0.8 + e / 100, "student_precision": 0.9} for e in range(11)]}
FW = {"turns": [{"turn": 0, "accuracy": 0.8, "macro_f1": 0.79, "escalation_rate": 0.4},
                {"turn": 1, "accuracy": 0.85, "macro_f1": 0.84, "escalation_rate": 0.3}]}
ROWS = [{"volume": v, "llm_only_usd": v * 1e-3, "flywheel_usd": 5 + v * 1e-4} for v in (1e3, 1e4, 1e5)]


def test_reliability_bars_say_how_many_images_they_hold(monkeypatch):
    fig = plotted(monkeypatch, lambda p: p.reliability(EV, "x.png"))
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert texts.count("n=2") == 2 and texts.count("n=31") == 2


@pytest.mark.parametrize("draw", [lambda p: p.reliability(EV, "x.png"), lambda p: p.cascade_tradeoff(CAS, "x.png"),
                                  lambda p: p.per_class_f1(EV, "x.png"), lambda p: p.flywheel_turns(FW, "x.png"),
                                  lambda p: p.cost_curve(ROWS, 5e3, "x.png")],
                         ids=["reliability", "cascade_tradeoff", "per_class_f1", "flywheel_turns", "cost_curve"])
def test_legends_never_cover_the_data(monkeypatch, draw):
    fig = plotted(monkeypatch, draw)
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert legends
    for leg in legends:
        box = leg.get_window_extent()
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent()), (ax.get_title(), box, ax.get_window_extent())

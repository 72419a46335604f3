"""The PNGs a run's reader would rather see than read. Each function reads artifact dicts (as written
by the pipeline) and writes one PNG; plot_confusion.py and the report step both call `plot_run`."""
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from flywheel.io import read_json  # noqa: E402
from flywheel.run import Paths, Turn  # noqa: E402

log = logging.getLogger(__name__)
DPI = 120


LEGEND_OUTSIDE = dict(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)  # never over data


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return Path(path)


def confusion(ev, path):
    cm = np.array(ev["confusion_matrix"], dtype=float)
    classes = ev["classes"]
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, m, title, fmt in ((axes[0], cm, "counts", "{:.0f}"), (axes[1], norm, "row-normalised (recall)", "{:.2f}")):
        im = ax.imshow(m, cmap="Blues")
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"test confusion, {title}")
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, fmt.format(m[i, j]), ha="center", va="center",
                        color="white" if m[i, j] > m.max() / 2 else "black", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"accuracy {ev['accuracy']:.3f}, macro-F1 {ev['macro_f1']:.3f}")
    return _save(fig, path)


def reliability(ev, path):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), sharey=True)
    for ax, key, ece_k, title in ((axes[0], "before", "ece_before", "before temperature scaling"),
                                  (axes[1], "after", "ece_after", f"after (T = {ev['temperature']:.3f})")):
        bins = ev["reliability"][key]
        ax.plot([0, 1], [0, 1], "--", color="gray", lw=1)
        if bins:
            centers = [(b["lo"] + b["hi"]) / 2 for b in bins]
            ax.bar(centers, [b["acc"] for b in bins], width=1 / 15, alpha=0.7, edgecolor="k", label="accuracy")
            ax.plot(centers, [b["conf"] for b in bins], "_", ms=14, mew=2.5, color="C3", label="mean confidence")
            for c, b in zip(centers, bins):  # how many images each bar stands on: a bar of 2 says little
                ax.text(c, 1.02, f"n={b['count']}", ha="center", va="bottom", fontsize=6, rotation=90)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.12)
        ax.set_xlabel("confidence")
        ax.set_title(f"{title}: ECE {ev[ece_k]:.3f}")
    axes[0].set_ylabel("accuracy (test); n = images in the bin")
    axes[1].legend(**LEGEND_OUTSIDE)
    return _save(fig, path)


def cascade_tradeoff(c, path):
    sw = [s for s in c["sweep"] if s["accuracy"] is not None]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot([s["escalation_rate"] for s in sw], [s["accuracy"] for s in sw], "-o", ms=3, label="cascade (estimated)")
    sp = [s for s in sw if s["student_precision"] is not None]
    ax.plot([s["escalation_rate"] for s in sp], [s["student_precision"] for s in sp], "-", alpha=0.6,
            label="student precision on kept items (exact)")
    t = c["test"]
    ax.plot([t["escalation_rate"]], [t["accuracy"]], "*", ms=16, color="C3",
            label=f"chosen tau = {c['tau']:.3f} (measured)")
    ax.set_xlabel("escalation rate (fraction sent to the LLM)")
    ax.set_ylabel("accuracy on test")
    ax.set_title("cascade trade-off: escalate more, pay more, get more right")
    ax.legend(**LEGEND_OUTSIDE)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def per_class_f1(ev, path):
    classes = ev["classes"]
    f1 = [ev["report"][c]["f1"] for c in classes]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.bar(classes, f1, color="C0")
    ax.axhline(ev["macro_f1"], color="C3", ls="--", label=f"macro-F1 {ev['macro_f1']:.3f}")
    for i, v in enumerate(f1):
        ax.text(i, v + 0.01, f"{v:.2f}", ha="center", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("F1 (test)")
    ax.set_title("per-class F1")
    ax.legend(**LEGEND_OUTSIDE)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    return _save(fig, path)


def flywheel_turns(fw, path):
    turns = fw["turns"]
    k = [t["turn"] for t in turns]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(k, [t["accuracy"] for t in turns], "-o", label="student test accuracy")
    ax.plot(k, [t["macro_f1"] for t in turns], "-s", label="macro-F1")
    ax.set_xlabel("flywheel turn")
    ax.set_ylabel("test score")
    ax.set_xticks(k)
    ax2 = ax.twinx()
    ax2.plot(k, [t["escalation_rate"] for t in turns], "--^", color="C3", label="escalation rate")
    ax2.set_ylabel("escalation rate at the same target precision")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3,
              fontsize=8)  # below the axes: the right-hand axis takes the space beside them
    ax.set_title("flywheel turns")
    return _save(fig, path)


def cost_curve(rows, breakeven, path, title="monthly cost"):
    v = [r["volume"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(v, [r["llm_only_usd"] for r in rows], "-o", label="LLM only")
    ax.plot(v, [r["flywheel_usd"] for r in rows], "-s", label="flywheel (student + escalations)")
    if breakeven:
        ax.axvline(breakeven, color="gray", ls="--", label=f"breakeven {breakeven:,.0f}/month")
    ax.set_xscale("log")
    costs = [r["llm_only_usd"] for r in rows] + [r["flywheel_usd"] for r in rows]
    if min(costs) > 0:
        ax.set_yscale("log")
    else:  # a zero cost (no fixed hosting, nothing escalated) cannot sit on a log axis
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set_ylim(bottom=0)
    ax.set_xlabel("items per month")
    ax.set_ylabel("USD per month")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(**LEGEND_OUTSIDE)
    return _save(fig, path)


def classification_report_text(ev) -> str:
    lines = [f"{'':<16}{'precision':>10}{'recall':>10}{'f1-score':>10}{'support':>10}"]
    for c in ev["classes"]:
        r = ev["report"][c]
        lines.append(f"{c:<16}{r['precision']:>10.4f}{r['recall']:>10.4f}{r['f1']:>10.4f}{r['support']:>10d}")
    n = sum(ev["report"][c]["support"] for c in ev["classes"])
    lines.append("")
    lines.append(f"{'accuracy':<16}{'':>20}{ev['accuracy']:>10.4f}{n:>10d}")
    lines.append(f"{'macro avg':<16}{'':>20}{ev['macro_f1']:>10.4f}{n:>10d}")
    return "\n".join(lines) + "\n"


def plot_run(artifacts: Path, flywheel_json: Path = None):
    """Every plot one turn's artifacts allow, written beside them -> ({name: path}, [what was skipped]).
    eval.json is required; cascade.json and the run's flywheel.json (default: artifacts/flywheel.json) are
    drawn when present. Raises FileNotFoundError naming the step that makes a file."""
    art = Path(artifacts)
    T = Turn(art)
    fw = Path(flywheel_json) if flywheel_json else Paths(art.parent).flywheel
    if not T.eval.exists():
        raise FileNotFoundError(f"{T.eval} is missing; run `uv run cifar_distill.py --step eval` first")
    ev = read_json(T.eval)
    out = {"confusion_matrix": confusion(ev, art / "confusion_matrix.png"),
           "reliability": reliability(ev, art / "reliability.png"),
           "per_class_f1": per_class_f1(ev, art / "per_class_f1.png")}
    (art / "classification_report.txt").write_text(classification_report_text(ev))
    out["classification_report"] = art / "classification_report.txt"
    missing = []
    if T.cascade.exists():
        out["cascade_tradeoff"] = cascade_tradeoff(read_json(T.cascade), art / "cascade_tradeoff.png")
    else:
        missing.append("cascade_tradeoff.png needs cascade.json: run --step cascade")
    if fw.exists() and len(read_json(fw)["turns"]) > 1:
        out["flywheel_turns"] = flywheel_turns(read_json(fw), art / "flywheel_turns.png")
    else:
        missing.append("flywheel_turns.png needs flywheel.json with a turn: run --step flywheel")
    return out, missing

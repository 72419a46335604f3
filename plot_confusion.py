"""Plots of a finished run, written next to its artifacts.

    uv run plot_confusion.py                          # the promoted turn of cifar5_run
    uv run plot_confusion.py --root my_run
    uv run plot_confusion.py --root my_run --artifacts my_run/artifacts/turn_1

Writes confusion_matrix.png (counts + row-normalised), reliability.png (before/after temperature
scaling), per_class_f1.png, cascade_tradeoff.png (with the chosen tau), flywheel_turns.png (when turns
exist) and classification_report.txt. eval.json is required; the others are drawn when present.
"""
import argparse
import sys
from pathlib import Path

from flywheel import FlywheelError
from flywheel.plots import plot_run
from flywheel.run import Paths, promoted


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="cifar5_run", metavar="DIR", help="run folder (default: cifar5_run)")
    p.add_argument("--artifacts", default=None, metavar="DIR", help="one turn's artifacts folder to read and write (default: the promoted turn's, the student that ships)")
    return p


def main(argv=None):
    try:
        return run(build_parser().parse_args(argv))
    except FlywheelError as e:  # a problem the user fixes (a missing step, a run folder in use): its message
        raise SystemExit(f"error: {e}") from None


def run(a):
    P = Paths(a.root)
    if a.artifacts:
        art, what = Path(a.artifacts), f"the artifacts in {a.artifacts}"
    else:
        p = promoted(P)
        art, what = p.dir, f"turn {p.turn}, the promoted student (best on validation)"
    print(f"drawing {what}")
    try:
        out, missing = plot_run(art, P.flywheel)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}")
    for name, path in out.items():
        print(f"wrote {path}")
    for m in missing:
        print(f"skipped {m}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()

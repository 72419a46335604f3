"""A command line that forgives and explains: argparse built from one table of options, grouped for
--help with what a newcomer needs first, no abbreviated flags, and a one-line error with the closest
valid flag, step or value instead of a usage dump.

Shortcut: "closest" is difflib's ratio (the same measure Python's own "did you mean" uses), case-folded.
"""
import argparse
import difflib
import re

from flywheel import FlywheelError

EXIT_USAGE = 1  # a bad flag or value: the README's exit-code table


class UsageError(FlywheelError, ValueError):
    """A flag or value the command line cannot take; str() is the one-line message."""


def closest(word, options, cutoff=0.6):
    """The valid option nearest to a mistyped one, or None. Case does not count.

    >>> closest("epohcs", ["epochs", "seed", "lr"]), closest("Pear", ["apple", "pear"]), closest("zzz", ["apple"])
    ('epochs', 'pear', None)
    """
    folded = {str(o).lower(): o for o in options}
    hit = difflib.get_close_matches(str(word).lower(), list(folded), n=1, cutoff=cutoff)
    return folded[hit[0]] if hit else None


def did_you_mean(word, options) -> str:
    """ "; did you mean X?" when one option is close, else the list of options (short lists only).

    >>> did_you_mean("lable", ["prep", "label"]), did_you_mean("q", ["a", "b"])
    ('; did you mean label?', ' (choose from a, b)')
    """
    hit = closest(word, options)
    if hit is not None:
        return f"; did you mean {hit}?"
    return f" (choose from {', '.join(map(str, options))})" if len(options) <= 12 else ""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the fix, raised as UsageError (the script prints it and
    exits EXIT_USAGE) instead of a usage dump and exit 2."""

    def error(self, message):
        flags = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        m = re.match(r"unrecognized arguments: (.*)", message)
        if m:
            bad = [w for w in m.group(1).split() if w.startswith("-")] or m.group(1).split()
            hints = [f"{w}{did_you_mean(w.split('=')[0], flags) if w.startswith('-') else ''}" for w in bad]
            raise UsageError(f"unknown argument {'; '.join(hints)} (`--help` lists every flag)")
        m = re.match(r"argument (--\w+): invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            choices = [c.strip().strip("'") for c in m.group(3).split(",")]
            raise UsageError(f"{m.group(1)} {m.group(2)!r} is not valid{did_you_mean(m.group(2), choices)}")
        raise UsageError(message)


def build_parser(groups: dict, start_here: list, choices: dict, description: str) -> OneLineParser:
    """groups: {group title: {name: (type, default, help)}}; start_here: the names shown first.
    Every help ends "(default: ...)"; a default of None shows as "unset"."""
    p = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                      allow_abbrev=False)
    specs = {n: s for g in groups.values() for n, s in g.items()}
    sections = {"start here": start_here, **{t: [n for n in g if n not in start_here] for t, g in groups.items()}}
    for title, names in sections.items():
        grp = p.add_argument_group(title)
        for name in names:
            typ, default, help_ = specs[name]
            shown = "unset" if default is None else default
            if typ is bool:
                grp.add_argument(f"--{name}", action="store_true", help=f"{help_} (default: {shown})")
            else:
                grp.add_argument(f"--{name}", type=typ, default=default, metavar=name.upper(),
                                 choices=choices.get(name), help=f"{help_} (default: {shown})")
    return p


def parse(parser, argv=None):
    """parse_args; a usage error is raised as UsageError (the script prints it and exits EXIT_USAGE)."""
    return parser.parse_args(argv)


def parse_shard(text):
    """--shard 'I/N' -> (I, N) with 0 <= I < N.

    >>> parse_shard("1/4")
    (1, 4)
    >>> parse_shard("4/4")
    Traceback (most recent call last):
    ...
    flywheel.cli.UsageError: --shard 4/4: I must be in 0..N-1 (parts are numbered from 0: 0/4, 1/4, 2/4, 3/4)
    """
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise UsageError(f"--shard {text}: expected I/N, e.g. 0/2 and 1/2 for two machines") from None
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard {text}: I must be in 0..N-1 (parts are numbered from 0: "
                         + ", ".join(f"{k}/{n}" for k in range(max(n, 1))) + ")")
    return i, n


def flag_error(flag, why):
    raise UsageError(f"--{flag} {why}")


def check_ranges(cfg, unit_interval, positive, non_negative, defaults):
    """Numeric flags out of range fail before any work, with the closest valid value.

    >>> check_ranges({"a": 1.5, "b": 2, "c": 0}, ["a"], ["b"], ["c"], {})
    Traceback (most recent call last):
    ...
    flywheel.cli.UsageError: --a must be in [0, 1], got 1.5 (closest valid: 1)
    """
    for k in unit_interval:
        if not 0.0 <= cfg[k] <= 1.0:
            flag_error(k, f"must be in [0, 1], got {cfg[k]} (closest valid: {min(max(cfg[k], 0.0), 1.0):g})")
    for k in positive:
        if not cfg[k] > 0:
            flag_error(k, f"must be > 0, got {cfg[k]} (for example {defaults.get(k)}, the default)")
    for k in non_negative:
        if cfg[k] < 0:
            flag_error(k, f"must be >= 0, got {cfg[k]} (closest valid: 0)")


def check_processes(cfg, world):
    """torchrun (world processes) and --shard: what runs in parts, and how."""
    if world > 1:  # under torchrun
        if cfg["step"] != "train":
            flag_error("step", f"{cfg['step']} does not run under torchrun; only --step train does (DistributedDataParallel)")
        if cfg["measure_noise_cost"]:
            flag_error("measure_noise_cost", "is not supported under torchrun; measure it in a single-process run")
        if cfg["batch_size"] % world:
            flag_error("batch_size", f"{cfg['batch_size']} must divide evenly over the {world} torchrun processes (it "
                                     f"is the global batch; each process takes an equal slice)")
    if cfg["shard"] is not None:
        cfg["shard_i"], cfg["shard_n"] = parse_shard(cfg["shard"])
        if cfg["step"] != "label":
            flag_error("shard", f"applies to --step label only (got --step {cfg['step']}); merge the shards' ledgers "
                                f"with --step merge")
        if cfg.get("label_map"):
            flag_error("label_map", "carries answers within labels.jsonl: run it once without --shard, then shard the rest")

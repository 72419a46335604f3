"""Class changes without paying twice: --label_map old=new (a rename, or classes merged into one) turns the
ledger's answers to the earlier question into answers to the new one.

Every answer is keyed by the question asked, class list included (flywheel.teacher.question_hash), so new
classes mean new keys and, left alone, every image asked again. With --label_map the label step finds the
earlier class list in the ledger (the class order of its first-pass answers), and for every image and pass
it would ask, appends the earlier answer under the new key: the label mapped, cost 0 (it was paid once,
under its own key, which stays), and `mapped` provenance naming the earlier key, label and map. A class the
new list adds is a different question: nothing carries, those images are asked again, and the dry run
counts them. Rows a person typed (review_labels.csv, human_review.csv, flywheel_labels.csv) are mapped too.

Shortcut taken: the earlier question is the earlier class list with this run's prompt, temperature and task
spec as recorded in task.json before this label step rewrites it; answers to a question that differed in
more than the class list do not carry.
"""
import copy
import logging
from collections import Counter
from typing import NamedTuple

from flywheel import FlywheelError
from flywheel.io import iter_jsonl, read_csv, write_csv

log = logging.getLogger(__name__)

MAPPED = "mapped"  # the purpose of a carried answer: counted as neither a paid call nor spend


class MapError(FlywheelError, ValueError):
    """A --label_map the run cannot use; the message names the fix."""


def parse_label_map(text, classes) -> dict:
    """'old=new,old2=new' -> {old: new}; every new must be one of classes.

    >>> parse_label_map("apple=fruit, pear=fruit", ["fruit", "mushroom"])
    {'apple': 'fruit', 'pear': 'fruit'}
    >>> parse_label_map("apple=fruti", ["fruit", "mushroom"])
    Traceback (most recent call last):
    ...
    flywheel.remap.MapError: --label_map 'apple=fruti': fruti is not one of the classes ['fruit', 'mushroom']; did you mean fruit?
    """
    from flywheel.cli import did_you_mean
    out = {}
    for part in (p.strip() for p in str(text).split(",")):
        old, eq, new = (s.strip() for s in part.partition("="))
        if not (eq and old and new):
            raise MapError(f"--label_map {part!r}: write old=new pairs separated by commas, e.g. apple=fruit,pear=fruit")
        if new not in classes:
            raise MapError(f"--label_map {part!r}: {new} is not one of the classes {list(classes)}{did_you_mean(new, classes)}")
        if out.get(old, new) != new:
            raise MapError(f"--label_map {part!r}: {old} is already mapped to {out[old]}; map each old class once")
        out[old] = new
    return out


def earlier_classes(orders: Counter, mapping, classes):
    """The class list answered before (among the ledger's first-pass class orders, most answers first) that
    the mapping turns into exactly these classes; None when none does (a class was added, or nothing to map).

    >>> orders = Counter({("apple", "pear", "kiwi"): 40, ("fruit", "kiwi"): 3})
    >>> earlier_classes(orders, {"apple": "fruit", "pear": "fruit"}, ["fruit", "kiwi"])
    ('apple', 'pear', 'kiwi')
    >>> earlier_classes(orders, {"apple": "fruit", "pear": "fruit"}, ["fruit", "kiwi", "fig"]) is None  # fig added
    True
    """
    for order, _ in orders.most_common():
        mapped = {mapping.get(c, c) for c in order}
        if list(order) != list(classes) and mapped == set(classes) and any(c in mapping for c in order):
            return order
    return None


def mapped_record(rec, call, mapping, text) -> dict:
    """An earlier answer `rec` as the answer to `call` (flywheel.labeling.Call): label mapped, cost 0, provenance.

    >>> from types import SimpleNamespace as N
    >>> r = mapped_record({"key": "s|1|m|q0", "label": "pear", "confidence": 0.9, "cost_usd": 0.01, "label_logprob": -0.1},
    ...                   N(key="s|1|m|q1", question="q1", class_order=["fruit", "kiwi"]), {"pear": "fruit"}, "pear=fruit")
    >>> r["key"], r["label"], r["cost_usd"], r["label_logprob"], r["mapped"]["from_label"]
    ('s|1|m|q1', 'fruit', 0.0, None, 'pear')
    """
    new = mapping.get(rec.get("label"), rec.get("label"))
    kept = {k: v for k, v in rec.items() if k not in ("v", "ts")}  # the ledger stamps its own version and time
    return {**kept, "key": call.key, "question": call.question, "class_order": list(call.class_order),
            "label": new, "purpose": MAPPED, "cost_usd": 0.0, "cost_estimated": False,
            # the token's log-probability was for the earlier label; a merged class has no such figure
            "label_logprob": rec.get("label_logprob") if new == rec.get("label") else None,
            "mapped": {"from_key": rec["key"], "from_label": rec.get("label"), "map": text}}


class Carried(NamedTuple):
    earlier: tuple        # the class list the answers were given for (empty when nothing could carry)
    records: dict         # {new key: the carried record} (appended unless a dry run)
    answered: set         # sha256s with a first answer to the new question now (carried or already there)


class WithCarried:
    """A ledger seen as if the carried records were in it (a dry run counts calls with it, writing nothing)."""

    def __init__(self, ledger, records):
        self._ledger, self._records = ledger, records

    def ok(self, key):
        return self._records.get(key) or self._ledger.ok(key)

    def __getattr__(self, name):
        return getattr(self._ledger, name)


def ledger_orders(ledger) -> Counter:
    """{class order (tuple): first-pass ok answers} over the whole ledger file."""
    out = Counter()
    for rec in _records(ledger, "read earlier questions"):
        if rec.get("pass") == 1 and rec.get("class_order"):
            out[tuple(rec["class_order"])] += 1
    return out


def _records(ledger, desc):
    """The ledger file's ok answers, streamed (a tqdm bar on a large file)."""
    if ledger.path.exists():
        for rec, _ in iter_jsonl(ledger.path, desc=desc, bar_from_bytes=64 << 20):
            if rec and rec.get("status") == "ok" and "key" in rec:
                yield rec


def carry_answers(ledger, paths_by_sha, qc, model, text, old_task, write=True) -> Carried:
    """For every image (paths_by_sha: {sha256: path in the run}) the ledger answered under the earlier class
    list, the answer to qc's question for each pass it lacks: mapped by `text` (--label_map) and appended
    (write False: returned only, for a dry run)."""
    mapping = parse_label_map(text, qc.classes)
    orders = ledger_orders(ledger)
    known = {c for o in orders for c in o}
    unknown = [c for c in mapping if c not in known]
    if unknown:
        from flywheel.cli import did_you_mean
        raise MapError(f"--label_map: {unknown[0]} is in no earlier answer's class list ({sorted(known - set(qc.classes)) or 'none'})"
                       f"{did_you_mean(unknown[0], sorted(known))}")
    earlier = earlier_classes(orders, mapping, qc.classes)
    if earlier is None:
        log.warning("label: --label_map %s turns no earlier class list into %s (a class was added, so the question "
                    "changed): those images are asked again", text, qc.classes)
        return Carried((), {}, set())
    old = copy.copy(qc)
    old.classes, old.task = list(earlier), old_task
    out, answered = {}, set()
    for rec in _records(ledger, "carry earlier answers"):
        sha, p = rec.get("sha256"), rec.get("pass")
        if sha not in paths_by_sha or p not in (1, 2) or rec["key"] != old.call(sha, p, model).key:
            continue
        call = qc.call(sha, p, model)
        if call.key not in out and ledger.ok(call.key) is None:
            out[call.key] = {**mapped_record(rec, call, mapping, text), "path": paths_by_sha[sha]}
        if p == 1:
            answered.add(sha)
    for r in out.values() if write else ():
        ledger.append(r)
    log.info("label: --label_map %s: %d earlier answer(s) to %s %s to %s at no cost", text, len(out), list(earlier),
             "carried" if write else "would carry", qc.classes)
    return Carried(earlier, out, answered)


def map_person_rows(P, manifest, mapping) -> int:
    """The labels in the files a person's answers live in (review_labels.csv, human_review.csv,
    flywheel_labels.csv) mapped, each file renamed into place; a row whose image moved (a merged class's
    folder) follows it by the image's sha256. -> rows changed."""
    from flywheel.io import sha256_file
    by_sha = {r["sha256"]: p for p, r in manifest.items()}
    changed = 0
    for path, fields in ((P.review, ["llm_label", "label_final"]), (P.human_review, ["student_label", "label_final"]),
                         (P.flywheel_labels, ["label"])):
        rows = read_csv(path) if path.exists() else []
        hit = [r for r in rows if any(r.get(f) in mapping for f in fields) or r["path"] not in manifest]
        for r in hit:
            r.update({f: mapping[r[f]] for f in fields if r.get(f) in mapping})
            old = P.out / r["path"]
            if r["path"] not in manifest and old.is_file():
                r["path"] = by_sha.get(sha256_file(old), r["path"])
        if hit:
            write_csv(path, list(rows[0]), rows)
            changed += len(hit)
    return changed


def carry_label_map(P, manifest, qc, model, text=None, dry_run=False) -> Carried:
    """The label step's side of --label_map: earlier answers carried to qc's classes (returned only in a dry
    run), and the labels in a person's files mapped. Without text: nothing is carried, and `answered` holds
    the images answered by an earlier --label_map, so the sample keeps them when the flag is dropped."""
    from flywheel.ledger import Ledger
    from flywheel.task import recorded_task
    train = {r["sha256"]: p for p, r in manifest.items() if r["split"] == "train"}
    if not text and not P.ledger.exists():
        return Carried((), {}, set())
    with Ledger(P.ledger) as ledger:
        if not text:
            shas = ledger.shas_with(MAPPED, 1)
            return Carried((), {}, {s for s in shas if s in train and ledger.ok(qc.call(s, 1, model).key)})
        c = carry_answers(ledger, train, qc, model, text, recorded_task(P.task), write=not dry_run)
    if c.earlier and not dry_run:
        n = map_person_rows(P, manifest, parse_label_map(text, qc.classes))
        log.info("label: --label_map mapped %d row(s) in the review files and flywheel labels", n)
    return c

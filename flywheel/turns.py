"""The flywheel's record of its turns (artifacts/flywheel.json): for each turn, what it cost, what it
labeled and how its student did, on test (measured) and on validation (what promotion compares)."""
from flywheel.costs import cost_per_1k
from flywheel.io import read_csv, read_json, write_csv, write_json
from flywheel.ledger import Ledger
from flywheel.run import Turn, validation_score
from flywheel.student import load_student

FLYWHEEL_LABEL_FIELDS = ["path", "label", "source", "turn"]


def load_turns(P) -> dict:
    """flywheel.json: {"turns": [entry per turn, in order]} (none yet: no turns)."""
    return read_json(P.flywheel) if P.flywheel.exists() else {"turns": []}


def turn_entry(P, T: Turn, turn) -> dict:
    """flywheel.json's entry for a turn whose eval and cascade ran."""
    e, c = read_json(T.eval), read_json(T.cascade)
    rows = read_csv(T.train_rows)
    t = c["test"]
    per_item = (t["cost_usd"] / t["llm_calls"]) if t["llm_calls"] else c["inputs"]["cost_per_call_usd"]
    calls_per_escalated = (t["llm_calls"] / (t["escalation_rate"] * t["n"])) if t["escalation_rate"] and t["n"] else \
        c["inputs"]["calls_per_item_llm_only"]
    with Ledger(P.ledger) as spend:
        total = spend.total_cost()
    return {"turn": turn, "n_labeled": len(rows), "spend_usd": round(total, 6), **validation_score(load_student(T.best)),
            "accuracy": e["accuracy"], "llm_calls_per_1k": round(1000 * t["llm_calls"] / t["n"], 1) if t["n"] else None,
            "macro_f1": e["macro_f1"], "escalation_rate": t["escalation_rate"], "tau": c["tau"],
            "cascade_accuracy": t["accuracy"],
            "cost_per_1k_usd": round(cost_per_1k(t["escalation_rate"], calls_per_escalated * per_item), 6),
            "llm_only_cost_per_1k_usd": round(1000 * c["inputs"]["calls_per_item_llm_only"] * c["inputs"]["cost_per_call_usd"], 6),
            "label_sources": e["label_sources"], "simulated": c["teacher"]["simulated"] or c["simulated_human"]}


def other_turns_labels(P, k) -> list:
    """flywheel_labels.csv's rows from turns other than k (a crashed turn k is redone whole)."""
    return [r for r in (read_csv(P.flywheel_labels) if P.flywheel_labels.exists() else []) if int(r["turn"]) != k]


def write_turn_labels(P, old, rows):
    """flywheel_labels.csv: the other turns' rows (other_turns_labels) and this turn's ([FlywheelLabel])."""
    write_csv(P.flywheel_labels, FLYWHEEL_LABEL_FIELDS, old + [r._asdict() for r in rows])


def add_turn(P, fly, entry):
    fly["turns"].append(entry)
    write_json(P.flywheel, fly)

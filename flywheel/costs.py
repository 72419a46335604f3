"""The cost model of the flywheel as pure functions (USD; volumes in items per month).

LLM-only:  volume * llm_cost_per_item
Flywheel:  fixed_monthly + volume * (student_cost_per_item + escalation_rate * escalated_item_cost)
An escalated item may cost more than one LLM-only call (the cascade asks the LLM twice, for QC);
escalated_item_cost defaults to llm_cost_per_item.
The one-time labeling spend is paid back by the monthly savings. Below the breakeven volume the
flywheel costs more; we say so rather than print a meaningless negative percentage.

Everything here is a pure function except `resolve_inputs`, which reads a run's JSON files for the
inputs no flag gave, and raises CostInputError naming the flag to pass when neither has one.
"""
import math
from types import SimpleNamespace

from flywheel import FlywheelError
from flywheel.io import read_json


class CostInputError(FlywheelError):
    """An input the cost model needs that neither a flag nor the run gives; the message names the flag."""

# The one definition of the LLM-only baseline: a production service that calls the LLM once per item.
# (The label step's QC asks twice; that is a labeling cost, not what serving LLM-only would pay.)
LLM_ONLY_CALLS_PER_ITEM = 1


def llm_only_monthly(volume, llm_cost_per_item):
    """USD per month when every item goes to the LLM.

    >>> llm_only_monthly(10_000, 0.0004)
    4.0
    """
    return volume * llm_cost_per_item


def flywheel_monthly(volume, escalation_rate, escalated_item_cost, student_cost_per_1k=0.0, fixed_monthly=0.0):
    """USD per month through the cascade.

    >>> round(flywheel_monthly(10_000, 0.2, 0.0004, student_cost_per_1k=0.01, fixed_monthly=5.0), 6)  # 5 + 0.1 + 0.8
    5.9
    """
    return fixed_monthly + volume * (student_cost_per_1k / 1000.0 + escalation_rate * escalated_item_cost)


def cost_per_1k(escalation_rate, llm_cost_per_item, student_cost_per_1k=0.0):
    """Variable cost of serving 1,000 items through the cascade.

    >>> round(cost_per_1k(0.2, 0.0004, 0.01), 6)
    0.09
    """
    return 1000.0 * escalation_rate * llm_cost_per_item + student_cost_per_1k


def student_cost_per_1k_from_throughput(img_per_s, cpu_hour_usd):
    """USD per 1,000 items for a machine costing cpu_hour_usd that serves img_per_s.

    >>> round(student_cost_per_1k_from_throughput(500, 0.05), 8)  # 1000 / 500 s = 2 s = 0.05 / 1800
    2.778e-05
    """
    return cpu_hour_usd / 3600.0 * (1000.0 / img_per_s)


def breakeven_volume(escalation_rate, llm_cost_per_item, student_cost_per_1k=0.0, fixed_monthly=0.0,
                     escalated_item_cost=None):
    """Monthly volume above which the flywheel is cheaper; 0 with no fixed cost; None if never.

    >>> round(breakeven_volume(0.2, 0.0004, 0.0, 32.0), 6)  # each item saves 0.00032
    100000.0
    >>> breakeven_volume(1.0, 0.0004, 0.01, 0.0) is None  # every item escalated: never cheaper
    True
    """
    esc = llm_cost_per_item if escalated_item_cost is None else escalated_item_cost
    saving_per_item = llm_cost_per_item - (student_cost_per_1k / 1000.0 + escalation_rate * esc)
    if saving_per_item <= 0:
        return None
    return fixed_monthly / saving_per_item


def payback_months(labeling_spend, monthly_savings):
    """Months until the one-time labeling spend is recovered; None when there are no savings.

    >>> payback_months(0.6, 0.3), payback_months(0.6, -1.0)
    (2.0, None)
    """
    if monthly_savings <= 0:
        return None
    return labeling_spend / monthly_savings


def breakeven_table(volumes, escalation_rate, llm_cost_per_item, student_cost_per_1k=0.0, fixed_monthly=0.0,
                    labeling_spend=0.0, escalated_item_cost=None):
    """Rows for each monthly volume. savings_pct is None below breakeven (the flywheel costs more there).

    >>> r = breakeven_table([1_000, 1_000_000], 0.2, 0.0004, 0.0, 32.0, 0.6)
    >>> [(x["volume"], x["savings_usd"], x["savings_pct"], x["verdict"]) for x in r]
    [(1000, -31.68, None, 'flywheel costs more'), (1000000, 288.0, 72.0, 'flywheel saves')]
    """
    esc = llm_cost_per_item if escalated_item_cost is None else escalated_item_cost
    rows = []
    for v in volumes:
        llm = llm_only_monthly(v, llm_cost_per_item)
        fw = flywheel_monthly(v, escalation_rate, esc, student_cost_per_1k, fixed_monthly)
        sav = llm - fw
        rows.append({"volume": int(v), "llm_only_usd": round(llm, 6), "flywheel_usd": round(fw, 6),
                     "savings_usd": round(sav, 6),
                     "savings_pct": round(100.0 * sav / llm, 2) if sav >= 0 and llm > 0 else None,
                     "extra_cost_usd": round(-sav, 6) if sav < 0 else 0.0,
                     "verdict": "flywheel saves" if sav > 0 else ("break even" if math.isclose(sav, 0, abs_tol=1e-12) else "flywheel costs more"),
                     "payback_months": payback_months(labeling_spend, sav)})
    return rows


# ----------------------------------------------------------------------------- inputs from a run
BREAKEVEN_DEFAULTS = dict(root=None, llm_cost=None, llm_calls_per_item=float(LLM_ONLY_CALLS_PER_ITEM), escalated_item_cost=None,
                          escalation_rate=None, labeling_usd=None, student_cost_per_1k=None, cpu_hour_usd=0.05,
                          student_img_per_s=None, fixed_monthly_usd=0.0, volume=100_000)


def resolve_inputs(a):
    """Flags first, then the run's artifacts -> (inputs dict, sources dict). Fails naming the flag.
    `a` has the attributes of BREAKEVEN_DEFAULTS (cost_breakeven.py's flags)."""
    from flywheel.run import Paths, promoted
    ls = cas = speed = None
    src = {}
    if a.root:  # the cascade and speed of the student that ships
        P = Paths(a.root)
        turn = promoted(P).turn
        T = P.turn(turn)
        src["turn"] = f"turn {turn}, the promoted student ({T.dir})"
        ls, cas, speed = (read_json(f) if f.exists() else None for f in (P.label_summary, T.cascade, T.speed))
    per_call = (ls or {}).get("mean_cost_per_call_usd")
    if a.llm_cost is not None:
        llm_cost, src["llm_cost_per_item"] = a.llm_cost, "--llm_cost"
    elif per_call:
        llm_cost = per_call * a.llm_calls_per_item
        src["llm_cost_per_item"] = f"label_summary.json mean cost per call ({'SIMULATED/estimated' if ls.get('cost_estimated') else 'measured'}) x {a.llm_calls_per_item} call(s)"
    else:
        raise CostInputError("no LLM cost: pass --llm_cost USD (per item), or --root a run whose label step ran")
    if a.escalation_rate is not None:
        esc, src["escalation_rate"] = a.escalation_rate, "--escalation_rate"
    elif cas:
        esc, src["escalation_rate"] = cas["test"]["escalation_rate"], "cascade.json (test split)"
    else:
        raise CostInputError("no escalation rate: pass --escalation_rate F, or --root a run whose cascade step ran")
    if a.escalated_item_cost is not None:
        esc_cost, src["escalated_item_cost"] = a.escalated_item_cost, "--escalated_item_cost"
    elif cas and per_call and a.llm_cost is None and cas["test"]["escalation_rate"] and cas["test"]["llm_calls"]:
        calls = cas["test"]["llm_calls"] / (cas["test"]["escalation_rate"] * cas["test"]["n"])
        esc_cost, src["escalated_item_cost"] = calls * per_call, f"cascade.json: {calls:.2f} calls per escalated item"
    else:
        esc_cost, src["escalated_item_cost"] = llm_cost, "= LLM-only cost per item"
    if a.labeling_usd is not None:
        lab, src["labeling_usd"] = a.labeling_usd, "--labeling_usd"
    elif ls:
        lab, src["labeling_usd"] = ls["cost_usd"], "label_summary.json cost_usd"
    else:
        lab, src["labeling_usd"] = 0.0, "none given (0)"
    if a.student_cost_per_1k is not None:
        stu, src["student_cost_per_1k"] = a.student_cost_per_1k, "--student_cost_per_1k"
    else:
        ips = a.student_img_per_s
        if ips is None and speed:
            best = max((r for r in speed["results"] if not r.get("speed_only")), key=lambda r: r["e2e_img_per_s"])
            ips = best["e2e_img_per_s"]
            src["student_img_per_s"] = f"speed.json: {best['backend']} on {best['device']} e2e ({speed['img_size']}px)"
        if ips is None:
            raise CostInputError("no student serving cost: pass --student_cost_per_1k USD, or --student_img_per_s N, "
                             "or run simple_speed_test.py on the run first")
        src.setdefault("student_img_per_s", "--student_img_per_s")
        stu = student_cost_per_1k_from_throughput(ips, a.cpu_hour_usd)
        src["student_cost_per_1k"] = f"--cpu_hour_usd {a.cpu_hour_usd} / {ips:.1f} img/s"
    for k, v in (("llm_cost_per_item", llm_cost), ("escalation_rate", esc), ("labeling_usd", lab), ("student_cost_per_1k", stu)):
        if v < 0:
            raise CostInputError(f"{k} must be >= 0, got {v}")
    if not 0 <= esc <= 1:
        raise CostInputError(f"--escalation_rate must be in [0, 1], got {esc}")
    simulated = bool((ls or {}).get("simulated")) and a.llm_cost is None
    return {"llm_cost_per_item": llm_cost, "escalated_item_cost": esc_cost, "escalation_rate": esc,
            "labeling_usd": lab, "student_cost_per_1k": stu, "fixed_monthly_usd": a.fixed_monthly_usd,
            "simulated_costs": simulated}, src


def breakeven_report(volumes, **overrides):
    """Everything cost_breakeven.py prints, as a dict: inputs (with sources), rows, breakeven, payback."""
    a = SimpleNamespace(**{**BREAKEVEN_DEFAULTS, **overrides})
    inp, src = resolve_inputs(a)
    args = (inp["escalation_rate"], inp["llm_cost_per_item"], inp["student_cost_per_1k"], inp["fixed_monthly_usd"],
            inp["labeling_usd"], inp["escalated_item_cost"])
    rows = breakeven_table(volumes, *args)
    ref = breakeven_table([a.volume], *args)[0]
    return {"inputs": {**inp, "sources": src, "volume_for_payback": a.volume}, "rows": rows,
            "breakeven_volume": breakeven_volume(inp["escalation_rate"], inp["llm_cost_per_item"],
                                                 inp["student_cost_per_1k"], inp["fixed_monthly_usd"],
                                                 inp["escalated_item_cost"]),
            "payback_months": payback_months(inp["labeling_usd"], ref["savings_usd"])}


def usd(x, nd=4) -> str:
    """Money as people write it: the sign before the dollar; None is n/a.

    >>> usd(1.92), usd(-1.92), usd(None), usd(-0.00001, 2)
    ('$1.9200', '-$1.9200', 'n/a', '$0.00')
    """
    if x is None:
        return "n/a"
    s = f"{abs(x):.{nd}f}"
    return ("-$" if x < 0 and float(s) != 0 else "$") + s

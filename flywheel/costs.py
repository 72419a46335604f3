"""The cost model of the flywheel as pure functions (USD; volumes in items per month).

LLM-only:  volume * llm_cost_per_item
Flywheel:  fixed_monthly + volume * (student_cost_per_item + escalation_rate * escalated_item_cost)
An escalated item may cost more than one LLM-only call (the cascade asks the LLM twice, for QC);
escalated_item_cost defaults to llm_cost_per_item.
The one-time labeling spend is paid back by the monthly savings. Below the breakeven volume the
flywheel costs more; we say so rather than print a meaningless negative percentage.
"""
import math


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

"""Economics of this pipeline: when does a distilled student + cascade beat calling the LLM on every item?

    uv run cost_breakeven.py --root cifar5_run                               # every input from a finished run
    uv run cost_breakeven.py --llm_cost 0.0004 --escalation_rate 0.2 --labeling_usd 0.6 \
        --student_cost_per_1k 0.002 --fixed_monthly_usd 20                   # plan before spending anything

Inputs (a flag always wins over the run's artifacts):
  LLM-only cost per item   --llm_cost, else the run's measured mean cost per call (labels.jsonl via
                           label_summary.json) x --llm_calls_per_item (a production LLM-only service: 1)
  escalated item cost      the cascade's measured LLM calls per escalated item x cost per call
  escalation rate          --escalation_rate, else cascade.json (test split)
  labeling spend           --labeling_usd, else label_summary.json cost_usd
  student serving cost     --student_cost_per_1k, else --cpu_hour_usd / measured e2e throughput
                           (ROOT/artifacts/speed.json from simple_speed_test.py, or --student_img_per_s)
  fixed hosting            --fixed_monthly_usd
Writes a table to stdout, and CSV, JSON and a cost-curve PNG (default prefix ROOT/artifacts/breakeven).
"""
import argparse
from pathlib import Path

from flywheel import FlywheelError
from flywheel.costs import BREAKEVEN_DEFAULTS, breakeven_report
from flywheel.io import write_csv, write_json

DEFAULT_VOLUMES = "1000,10000,100000,1000000,10000000"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None, metavar="DIR", help="a finished run to read inputs from (default: none, flags only)")
    p.add_argument("--llm_cost", type=float, default=None, metavar="USD", help="LLM-only cost per item (default: from the run)")
    p.add_argument("--llm_calls_per_item", type=float, default=BREAKEVEN_DEFAULTS["llm_calls_per_item"], metavar="N", help="LLM calls per item when serving LLM-only (default: 1.0)")
    p.add_argument("--escalated_item_cost", type=float, default=None, metavar="USD", help="LLM cost of one escalated item (default: from the run's cascade, else --llm_cost)")
    p.add_argument("--escalation_rate", type=float, default=None, metavar="F", help="fraction of items the student escalates (default: from cascade.json)")
    p.add_argument("--labeling_usd", type=float, default=None, metavar="USD", help="one-time labeling spend (default: from label_summary.json, else 0)")
    p.add_argument("--student_cost_per_1k", type=float, default=None, metavar="USD", help="student serving cost per 1,000 items (default: derived from throughput)")
    p.add_argument("--cpu_hour_usd", type=float, default=BREAKEVEN_DEFAULTS["cpu_hour_usd"], metavar="USD", help="price of the serving machine per hour (default: 0.05)")
    p.add_argument("--student_img_per_s", type=float, default=None, metavar="N", help="student throughput (default: best e2e figure in ROOT/artifacts/speed.json)")
    p.add_argument("--fixed_monthly_usd", type=float, default=BREAKEVEN_DEFAULTS["fixed_monthly_usd"], metavar="USD", help="fixed monthly hosting of the student (default: 0.0)")
    p.add_argument("--volumes", default=DEFAULT_VOLUMES, metavar="LIST", help=f"comma-separated monthly volumes (default: {DEFAULT_VOLUMES})")
    p.add_argument("--volume", type=float, default=BREAKEVEN_DEFAULTS["volume"], metavar="N", help="monthly volume for the headline payback figure (default: 100000)")
    p.add_argument("--out_prefix", default=None, metavar="PATH", help="prefix for .csv/.json/.png (default: ROOT/artifacts/breakeven, or ./breakeven)")
    p.add_argument("--json", default=None, metavar="PATH", help="JSON output path (default: OUT_PREFIX.json)")
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    try:
        volumes = [int(float(v)) for v in a.volumes.split(",") if v.strip()]
        assert volumes and all(v > 0 for v in volumes)
    except (ValueError, AssertionError):
        raise SystemExit(f"error: --volumes must be positive numbers separated by commas, got {a.volumes!r}")
    if a.fixed_monthly_usd < 0:
        raise SystemExit("error: --fixed_monthly_usd must be >= 0")
    try:
        out = breakeven_report(volumes, **{k: getattr(a, k) for k in BREAKEVEN_DEFAULTS})
    except FlywheelError as e:  # an input neither a flag nor the run gives: the message names the flag
        raise SystemExit(f"error: {e}") from None
    inp, src, rows = out["inputs"], out["inputs"]["sources"], out["rows"]
    be, pay = out["breakeven_volume"], out["payback_months"]
    if "turn" in src:
        print(f"inputs from {src['turn']}")
    if inp["simulated_costs"]:
        print("NOTE: this run used the SIMULATED oracle teacher; its per-call cost is the --usd_per_call estimate.")
    for k, v in inp.items():
        if k in ("sources", "volume_for_payback"):
            continue
        shown = f"{v:.6g}" if isinstance(v, float) else str(v)
        print(f"  {k:<22} {shown:<12} ({src.get(k, 'flag or default')})")
    print(f"\n{'volume/month':>13}{'LLM-only $':>13}{'flywheel $':>13}{'savings $':>13}{'savings %':>11}  verdict")
    for r in rows:
        pct = f"{r['savings_pct']:.1f}%" if r["savings_pct"] is not None else "-"
        print(f"{r['volume']:>13,}{r['llm_only_usd']:>13.2f}{r['flywheel_usd']:>13.2f}{r['savings_usd']:>13.2f}{pct:>11}  "
              + (r["verdict"] if r["savings_usd"] >= 0 else f"flywheel costs ${r['extra_cost_usd']:.2f} more"))
    if be is None:
        print("\nbreakeven: never - each item costs at least as much through the cascade as through the LLM alone")
    else:
        print(f"\nbreakeven: {be:,.0f} items/month; below it the flywheel costs more than calling the LLM")
    print(f"payback of ${inp['labeling_usd']:.4f} labeling at {a.volume:,.0f} items/month: "
          + (f"{pay:.2f} months" if pay is not None else "never (no monthly savings at that volume)"))
    prefix = Path(a.out_prefix) if a.out_prefix else ((Path(a.root) / "artifacts" / "breakeven") if a.root else Path("breakeven"))
    prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path = Path(a.json) if a.json else prefix.with_suffix(".json")
    write_json(json_path, out)
    write_csv(prefix.with_suffix(".csv"), list(rows[0]), rows)
    from flywheel.plots import cost_curve
    cost_curve(rows, be, prefix.with_suffix(".png"), "monthly cost: LLM only vs flywheel"
               + (" (SIMULATED costs)" if inp["simulated_costs"] else ""))
    print(f"wrote {json_path}, {prefix.with_suffix('.csv')}, {prefix.with_suffix('.png')}")
    return out


if __name__ == "__main__":
    main()

"""What people read: report.md and datacard.md (every number read from the run file named in its section,
never typed by hand), and the console tables the steps print.
"""
import json
import logging
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from flywheel.costs import breakeven_report, usd
from flywheel.io import atomic_write_bytes, read_json
from flywheel.plots import plot_run
from flywheel.run import promoted
from flywheel.student import load_student

log = logging.getLogger(__name__)

BREAKEVEN_VOLUMES = [10_000, 100_000, 1_000_000]  # items per month in the report's breakeven table


def fmt(x, nd=3):
    """A figure, or n/a.

    >>> fmt(0.12345), fmt(None), fmt(2, 1)
    ('0.123', 'n/a', '2.0')
    """
    return "n/a" if x is None else f"{x:.{nd}f}"


def pct(x):
    """A share as a percentage, or n/a.

    >>> pct(0.1234), pct(None)
    ('12.3%', 'n/a')
    """
    return "n/a" if x is None else f"{100 * x:.1f}%"


def mean(xs):
    """The mean, or None for nothing.

    >>> mean([True, False, True, True]), mean([])
    (0.75, None)
    """
    return sum(xs) / len(xs) if xs else None


class RunFigures(NamedTuple):
    """The files a report is read from, for the promoted turn."""
    ls: dict              # label_summary.json
    art: Path             # the promoted turn's artifacts folder
    turn: int
    ev: dict              # its eval.json
    prep: dict            # prep.json
    cas: object           # its cascade.json, or None
    fly: object           # flywheel.json, or None
    speed: object         # its speed.json, or None
    exp: object           # export.json, or None
    best: dict            # its best.pt


def load_figures(P) -> RunFigures:
    def optional(path):
        return read_json(path) if Path(path).exists() else None
    turn = promoted(P).turn  # every student figure is of the promoted student
    T = P.turn(turn)
    return RunFigures(read_json(P.need(P.label_summary, "label")), T.dir, turn, read_json(P.need(T.eval, "eval")),
                      read_json(P.need(P.prep_json, "prep")), optional(T.cascade), optional(P.flywheel),
                      optional(T.speed), optional(P.export), load_student(T.best))


def write_report(P):
    """Every artifact of the run -> report.md (plots embedded) and datacard.md. No number is typed by
    hand: each comes from the JSON file named in its section."""
    R = load_figures(P)
    plots, _ = plot_run(R.art, P.flywheel)  # the promoted turn's own plots, drawn from its artifacts
    L = (header_lines(P, R) + data_teacher_lines(P, R) + student_lines(P, R) + cascade_flywheel_lines(P, R)
         + throughput_lines(P, R) + production_lines(P) + plot_lines(P, plots))
    atomic_write_bytes(P.report, ("\n".join(L) + "\n").encode())
    write_datacard(P, R.ls, R.ev, R.prep, R.best, R.cas)
    log.info("report: wrote %s, %s", P.report, P.datacard)
    return P.report


def production_lines(P) -> list:
    """Serving's escalation rate over time, per answered class, per image size and per client source, from
    production_stats.jsonl (each server's last running total)."""
    from flywheel.io import read_jsonl
    from flywheel.monitor import escalation_table
    if not P.production_stats.exists():
        return []
    last = {}
    for rec in read_jsonl(P.production_stats)[0]:
        last[rec["server"]] = rec
    snaps = list(last.values())
    L = ["## Production", "", f"What `--step serve` answered ({len(snaps)} server run(s), from "
         f"`{P.production_stats.name}`): requests, and the share that went past the student (to the LLM or a "
         "person), by slice.", ""]
    for dim, title in (("hour", "hour (UTC)"), ("class", "answered class"), ("size", "image size (shorter side)"),
                       ("source", "client source (form field `source`)")):
        rows = escalation_table(snaps, dim)
        if rows:
            L += [f"| {title} | requests | escalated |", "|---|---|---|"]
            L += [f"| {v} | {n} | {100 * e:.1f}% |" for v, n, e in rows] + [""]
    return L


def header_lines(P, R):
    ls, art, turn, ev, prep, cas, fly, speed, exp, best = R
    L = []
    sim_teacher = bool(ls.get("simulated"))
    sim_human = bool(cas and cas.get("simulated_human"))
    L = [f"# cifar_distill run report: `{P.out}`", ""]
    if sim_teacher or sim_human:
        L += ["> **SIMULATED PARTS — read every number below with this in mind.**"]
        if sim_teacher:
            L += [f"> - The teacher is the **oracle** (`{ls['model']}`): manifest ground truth with injected noise, "
                  f"not an LLM. Its costs are `--usd_per_call` estimates, not money spent."]
        if sim_human:
            L += ["> - Human-review answers are **simulated** from ground truth (`--simulate_human`)."]
        L += [""]
    L += [f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from the artifacts under `{P.out}`; every number is read "
          f"from the file named in its section.", "",
          f"**Promoted student: turn {turn}** (`{art.relative_to(P.out).as_posix()}/best.pt`), the turn with the best "
          f"validation accuracy ({best['best_val_acc']:.4f}); the test split never chose it. Export"
          f"{' (turn ' + str(exp.get('turn')) + ')' if exp else ''}, the student and cascade sections and the "
          f"breakeven use it.", "",
          f"## Config ({art.relative_to(P.out).as_posix()}/best.pt)", "", "| key | value |", "|---|---|"]
    c = best["config"]
    for k in ("student", "weights", "epochs", "batch_size", "lr", "weight_decay", "val_frac", "seed", "img_size", "device"):
        L.append(f"| {k} | {c.get(k)} |")
    L += [f"| classes | {', '.join(best['classes'])} |", f"| teacher | {ls['source']}: {ls['model']} (prompt {ls['prompt_version']}) |",
          f"| second pass | {ls['second_pass']}, accept at mean confidence >= {ls['conf_thresh']} |", ""]
    return L


def data_teacher_lines(P, R):
    ls, art, turn, ev, prep, cas, fly, speed, exp, best = R
    L = []
    L += ["## Data (prep.json)", "", "| split | " + " | ".join(prep["classes"]) + " | total |",
          "|---|" + "---|" * (len(prep["classes"]) + 1)]
    for split, counts in prep["counts"].items():
        L.append(f"| {split} | " + " | ".join(str(counts[k]) for k in prep["classes"]) + f" | {sum(counts.values())} |")
    L += ["", f"Images: {prep['settings']['img_size']}px, sharpen={prep['settings']['sharpen']}, source `{prep['source']}`; "
          f"{len(prep['skipped'])} unreadable file(s) skipped.", ""]
    L += ["## Teacher (label_summary.json)", "", "| metric | value |", "|---|---|",
          f"| model | {ls['model']} |", f"| prompt version | {ls['prompt_version']} |",
          f"| requested images | {ls['requested_images']} |", f"| accepted | {ls['accepted']} |",
          f"| disagreed | {ls['disagreed']} |", f"| low confidence | {ls['low_confidence']} |",
          f"| invalid | {ls['invalid']} |", f"| failed | {ls['failed']} |", f"| paid calls | {ls['calls']} |",
          f"| spend | {usd(ls['cost_usd'])}{' (estimated)' if ls['cost_estimated'] else ''} |",
          f"| agreement rate | {fmt(ls['agreement_rate'], 4)} |",
          f"| accepted-label accuracy | {fmt(ls['teacher_accuracy'], 4)} |",
          f"| first-pass accuracy | {fmt(ls['pass1_accuracy'], 4)} |",
          f"| gold accuracy | {fmt(ls['gold_accuracy'], 4)}"
          f"{' (gold pins from --gold_n: a SIMULATED person, the dataset labels)' if (ls.get('gold') or {}).get('simulated') else ''} |",
          f"| yield (accepted / requested) | {pct(ls.get('yield'))} |",
          "| accepted-label accuracy estimated from gold pins | "
          + (f"{fmt(ls['estimated_accuracy']['accuracy'], 4)} (95% CI {ls['estimated_accuracy']['ci95'][0]}-"
             f"{ls['estimated_accuracy']['ci95'][1]})" if ls.get("estimated_accuracy") else "n/a (no gold pins)") + " |",
          f"| QC rule | {(ls.get('qc_rule') or {}).get('why') or ls['second_pass']} |", ""]
    return L


def student_lines(P, R):
    ls, art, turn, ev, prep, cas, fly, speed, exp, best = R
    L = []
    L += [f"## Student (turn {turn} eval.json, official test split)", "", "| metric | value |", "|---|---|",
          f"| accuracy | {ev['accuracy']:.4f} |", f"| macro-F1 | {ev['macro_f1']:.4f} |",
          f"| ECE before | {ev['ece_before']:.4f} |", f"| ECE after | {ev['ece_after']:.4f} |",
          f"| temperature | {ev['temperature']:.4f} |", f"| n_train | {ev['n_train']} |", f"| n_val | {ev['n_val']} |", f"| calibrated on | {ev.get('calibrated_on', 'validation split')} ({ev.get('n_cal') or ev['n_val']}) |",
          f"| n_test | {ev['n_test']} |", f"| training labels vs truth | {ev['teacher_accuracy']:.4f} |",
          f"| label sources | {', '.join(f'{k}: {v}' for k, v in ev['label_sources'].items())} |"]
    if ev.get("noise_cost"):
        L += [f"| same training on ground-truth labels (measured only) | {ev['noise_cost']['ground_truth_twin_accuracy']:.4f} |",
              f"| cost of label noise | {ev['noise_cost']['noise_cost_pts']:.2f} pts |"]
    L += [""]
    if ev.get("calibration_warning"):
        L += [f"> **Calibration warning:** {ev['calibration_warning']}.", ""]
    L += [
          "Coverage at fixed precision (threshold fitted on validation, measured on test):", "",
          "| target precision | tau | test coverage | test precision |", "|---|---|---|---|"]
    for t, cv in ev["coverage_at_precision"].items():
        L.append(f"| {t} | {cv['tau']:.4f} | {cv['coverage']:.4f} | {fmt(cv['precision'], 4)} |")
    L.append("")
    return L


def cascade_flywheel_lines(P, R):
    ls, art, turn, ev, prep, cas, fly, speed, exp, best = R
    L = []
    if cas:
        L += [f"## Cascade (cascade.json, tau = {cas['tau']:.4f} by {cas['tau_rule']})", "",
              "| split | n | student | llm | human | accuracy | LLM calls | LLM-only calls | cost | LLM-only cost | ms/item |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
        for split in ("test", "pool"):
            r = cas[split]
            L.append(f"| {split} | {r['n']} | {pct(r['routes']['student'])} | {pct(r['routes']['llm'])} | "
                     f"{pct(r['routes']['human'])} | {fmt(r['accuracy'], 4)} | {r['llm_calls']} | {r['llm_only_calls']} | "
                     f"{usd(r['cost_usd'])} | {usd(r['llm_only_cost_usd'])} | {r['mean_latency_ms']:.1f} |")
        L += ["", "Route accuracy on test: " + ", ".join(f"{k} {fmt(v, 4)}" for k, v in cas["test"]["route_accuracy"].items())
              + (f"; {cas['test']['human_pending']} item(s) still wait for a human in human_review.csv" if cas["test"]["human_pending"] else ""), ""]
        L += rule_comparison_lines(cas.get("rule_comparison"))
    if fly:
        L += ["## Flywheel turns (flywheel.json)", "", "| turn | labeled | spend | test accuracy | macro-F1 | escalation rate | $ per 1k served |",
              "|---|---|---|---|---|---|---|"]
        for t in fly["turns"]:
            L.append(f"| {t['turn']} | {t['n_labeled']} | {usd(t['spend_usd'])} | {t['accuracy']:.4f} | {t['macro_f1']:.4f} | "
                     f"{t['escalation_rate']:.4f} | {usd(t['cost_per_1k_usd'])} |")
        L.append("")
    return L


def throughput_lines(P, R):
    ls, art, turn, ev, prep, cas, fly, speed, exp, best = R
    L = []
    L += ["## Throughput and breakeven", ""]
    if exp:
        L += [f"Export (export.json): ONNX max |dp| {exp['onnx']['max_abs_diff']:.2e}, agreement {exp['onnx']['agreement']:.4f}; "
              f"TorchScript max |dp| {exp['torchscript']['max_abs_diff']:.2e}, agreement {exp['torchscript']['agreement']:.4f}.", ""]
    if speed:
        m = speed["machine"]
        L += [f"speed.json ({m['cpu']}, {m['cores']} cores, torch {m['torch']}, onnxruntime {m['onnxruntime']}, "
              f"{speed['img_size']}px):", "", "| student | backend | device | model img/s | e2e img/s | p50 ms b1 | p95 ms b1 |",
              "|---|---|---|---|---|---|---|"]
        for r in speed["results"]:
            who = r.get("student", "") + (" (random weights: speed only)" if r.get("speed_only") else "")
            L.append(f"| {who} | {r['backend']} | {r['device']} | {r['model_img_per_s']:.1f} | {r['e2e_img_per_s']:.1f} | "
                     f"{r['p50_ms_b1']:.2f} | {r['p95_ms_b1']:.2f} |")
        L.append("")
    else:
        L += ["No speed.json: run `uv run simple_speed_test.py --root " + str(P.out) + "` to measure throughput.", ""]
    if cas:
        be = breakeven_report(BREAKEVEN_VOLUMES, root=str(P.out),
                              **({} if speed else {"student_cost_per_1k": 0.0}))
        L += ["Breakeven (flywheel.costs with this run's inputs" + ("" if speed else "; student serving cost taken as 0: not measured")
              + ", no fixed hosting; `cost_breakeven.py` explores other inputs):", "",
              "| items/month | LLM-only | flywheel | savings | verdict |", "|---|---|---|---|---|"]
        for r in be["rows"]:
            L.append(f"| {r['volume']:,} | {usd(r['llm_only_usd'])} | {usd(r['flywheel_usd'])} | {usd(r['savings_usd'])} | {r['verdict']} |")
        L += ["", "Breakeven volume: " + ("never (an escalated item costs more than the LLM-only call it replaces, times the "
                                          "escalation rate)" if be["breakeven_volume"] is None else
                                          "cheaper from the first item (no fixed hosting assumed)" if be["breakeven_volume"] == 0 else
                                          f"{be['breakeven_volume']:,.0f} items/month"), ""]
    return L


def plot_lines(P, plots):
    """Markdown image lines for the promoted turn's plots."""
    L = []
    L += ["## Plots", ""]
    for name, path in plots.items():
        if str(path).endswith(".png"):
            L.append(f"![{name}]({Path(path).relative_to(P.out).as_posix()})")
    return L


def rule_comparison_lines(rc):
    """report.md's table of the cascade rules on the same LLM answers (cascade.json rule_comparison)."""
    if not rc:
        return []
    L = [f"The test split, its escalations' {rc['llm_calls_both']} LLM calls routed by each rule "
         f"(ground truth measures, never chooses):", "",
         "| rule | wrong answers returned without a person | sent to a person | accuracy without a person |", "|---|---|---|---|"]
    for name, label in (("student_then_llm", "student, then the LLM's label"),
                        ("combined", f"combined evidence (--contest_below {rc['contest_below']})")):
        t = rc[name]
        L.append(f"| {label} | {t['wrong_without_person']} | {t['to_person']} | {fmt(t['accuracy_without_person'], 4)} |")
    return L + ["", f"{rc['contested']} LLM label(s) contested; the LLM was wrong on {rc['contested_llm_wrong']} of them.", ""]


def label_model_text(rule):
    """The label model's signals, how each separated right first answers from wrong ones on gold, and its
    cross-validated calibration, as a clause of the datacard (empty for the older rules).

    >>> label_model_text({"report": {"signals": ["confidence"], "auroc_on_gold": {"confidence": 0.8},
    ...                              "calibration_cv": {"first": {"brier": 0.1, "ece": 0.05, "mean_p": 0.8, "rate": 0.82}}}})
    '. Label model signals: confidence; AUROC on gold for a right first answer: confidence 0.8; cross-validated on gold: Brier 0.1, ECE 0.05, mean probability 0.8 vs 0.82 right'
    """
    r = (rule or {}).get("report")
    if not r:
        return ""
    held = r.get("held_out") or {}
    cal = (r.get("calibration_cv") or {}).get("first") or {}
    return (f". Label model signals: {', '.join(r['signals'])}"
            + (f" (held-out model on {held['representation']})" if held else "")
            + ("; AUROC on gold for a right first answer: " + ", ".join(f"{k} {v}" for k, v in r["auroc_on_gold"].items())
               if r.get("auroc_on_gold") else "; no gold pins: stated priors")
            + (f"; cross-validated on gold: Brier {cal['brier']}, ECE {cal['ece']}, mean probability {cal['mean_p']} vs "
               f"{cal['rate']} right" if cal else ""))


def task_text(P) -> str:
    """The task spec the teacher was asked with (task.json), as the datacard prints it."""
    if not P.task.exists():
        return "**Task.** The built-in prompt: the class names alone (no --task spec)."
    t = read_json(P.task)
    ex = sum(len(v) for v in t["examples"].values())
    return (f"**Task** (spec {t['path']}, digest {t['digest']}, part of every ledger key). {t['description']} Classes: "
            + "; ".join(f"**{c}**: {d}" for c, d in t["classes"].items())
            + f". {ex} few-shot example image(s)" + (f"; written for {json.dumps(t['settings'])}" if t["settings"] else "") + ".")


def write_datacard(P, ls, ev, prep, best, cas):
    cm = np.array(ev["confusion_matrix"])
    off = [(cm[i, j], ev["classes"][i], ev["classes"][j]) for i in range(len(cm)) for j in range(len(cm)) if i != j and cm[i, j]]
    top = sorted(off, reverse=True)[:3]
    src = ev["label_sources"]
    L = ["# Datacard", "",
         f"**Dataset.** {'CIFAR-100 (python version), fine classes' if prep['settings']['dataset'] == 'cifar100' else 'image folder ' + prep['source']}: "
         f"{', '.join(prep['classes'])}. Train/test counts: "
         + "; ".join(f"{s}: {sum(c.values())}" for s, c in prep["counts"].items()) + ". "
         f"Images upscaled to {prep['settings']['img_size']}px (bicubic{', unsharp mask' if prep['settings']['sharpen'] else ''}), JPEG q{prep['settings']['jpeg_quality']}.",
         "", "**Label sources used for training** (artifacts/train_rows.csv): " + ", ".join(f"{k} {v}" for k, v in src.items()) + ".",
         "", f"**Teacher.** {ls['model']} (source `{ls['source']}`{', SIMULATED' if ls.get('simulated') else ''}), prompt version "
         f"{ls['prompt_version']}, {ls['calls']} paid calls, {usd(ls['cost_usd'])}{' (estimated)' if ls['cost_estimated'] else ''}.",
         "", "**Acceptance rules.** Each image gets two teacher passes: the classes in the given order at temperature 0, then "
         "in another order at a temperature above 0" + (" (adaptive: the second pass only below the confidence threshold, plus an audit fraction)" if ls["second_pass"] == "adaptive" else "")
         + (f". Rule in force (--second_pass {ls['second_pass']}): {ls['qc_rule']['why']}; a second answer comes "
            f"from {ls.get('second_model') or 'the same model'}" + label_model_text(ls['qc_rule'])
            if ls.get("qc_rule") else f". A label is accepted when the passes agree and their mean confidence is >= {ls['conf_thresh']}")
         + (f". Estimated accepted-label accuracy from gold pins: {ls['estimated_accuracy']['accuracy']} (95% CI "
            f"{ls['estimated_accuracy']['ci95'][0]}-{ls['estimated_accuracy']['ci95'][1]})" if ls.get("estimated_accuracy") else "")
         + ". Replies that are "
         "not JSON or name no listed class are invalid and never accepted. A person's edit of `label_final` in "
         "review_labels.csv overrides the teacher (source `human`). Flywheel turns add pool items the cascade escalated "
         "(source `escalation`) or a person answered (`human`; `simulated_human` offline). Test images never enter training.",
         "", task_text(P),
         "", "**Provenance.** Every teacher call is a line of labels.jsonl with image sha256, pass, model, host, prompt "
         "version, raw reply, tokens, cost and time; every escalation a line of escalations.jsonl.",
         "", "**Known limitations.**",
         "- CIFAR-100's own labels are noisy and some classes overlap visually (e.g. apple / orange / pear at 32px).",
         f"- The sources are 32x32 pixels upscaled to {prep['settings']['img_size']}px: the teacher and the student see "
         "interpolated detail, not real resolution.",
         f"- Accepted teacher labels were {fmt(ls['teacher_accuracy'], 4)} accurate against ground truth; the student learns "
         "their errors too.",
         "- Most frequent test confusions (true -> predicted: count): " + (", ".join(f"{a} -> {b}: {n}" for n, a, b in top) or "none") + ".",
         f"- {'Everything here was produced with a SIMULATED teacher; rerun with a real LLM before drawing conclusions.' if ls.get('simulated') else 'A single teacher model: its biases are shared by both passes and are not caught by their agreement.'}"]
    atomic_write_bytes(P.datacard, ("\n".join(L) + "\n").encode())


def print_eval_table(e, T):
    lines = [f"{'class':<16}{'precision':>10}{'recall':>8}{'f1':>8}{'n':>6}"]
    for c, r in e["report"].items():
        lines.append(f"{c:<16}{r['precision']:>10.3f}{r['recall']:>8.3f}{r['f1']:>8.3f}{r['support']:>6d}")
    lines.append(f"accuracy {e['accuracy']:.4f} | macro-F1 {e['macro_f1']:.4f} | ECE {e['ece_before']:.4f} -> "
                 f"{e['ece_after']:.4f} (T={e['temperature']:.3f}) | teacher label acc {e['teacher_accuracy']:.4f}")
    for t, c in e["coverage_at_precision"].items():
        lines.append(f"target precision {t}: tau {c['tau']:.3f} -> test coverage {c['coverage']:.3f}, precision "
                     f"{fmt(c['precision'])}")
    if e.get("noise_cost"):
        n = e["noise_cost"]
        lines.append(f"label noise costs the student {n['noise_cost_pts']:+.2f} pts: the same training on ground-truth "
                     f"labels reaches {n['ground_truth_twin_accuracy']:.4f} (measured only)")
    lines.append(f"wrote {T.eval}, {T.test_predictions}")
    print("\n".join(lines))


def print_cascade(P, T, result):
    for split in ("test", "pool"):
        r = result[split]
        log.info("cascade %s: n=%d routes %s | accuracy %s | LLM calls %d ($%.4f) vs LLM-only %d ($%.4f) | "
                 "~%.0f ms/item%s", split, r["n"], {k: round(v, 3) for k, v in r["routes"].items()}, fmt(r["accuracy"]),
                 r["llm_calls"], r["cost_usd"], r["llm_only_calls"], r["llm_only_cost_usd"], r["mean_latency_ms"],
                 f" | {r['human_pending']} awaiting a human in {P.human_review}" if r["human_pending"] else "")
    c = result.get("rule_comparison")
    if c:
        log.info("cascade test, same %d LLM calls: combined rule %d wrong answers without a person, %d to a person; "
                 "student-then-LLM %d and %d (%d LLM labels contested, %d of them wrong)", c["llm_calls_both"],
                 c["combined"]["wrong_without_person"], c["combined"]["to_person"],
                 c["student_then_llm"]["wrong_without_person"], c["student_then_llm"]["to_person"],
                 c["contested"], c["contested_llm_wrong"])
    v = result.get("escalation_value_on_gold")
    if v and v["n"]:
        log.info("cascade: on the %d gold pins below tau, the LLM's first answer was right %s, the student %s (sign "
                 "test p = %s that the LLM is worse there)", v["n"], fmt(v["llm_right"]), fmt(v["student_right"]),
                 v.get("p_llm_worse"))
    log.info("cascade: wrote %s, %s, %s%s", T.cascade, P.escalations, P.human_review,
             " (SIMULATED human answers)" if result["simulated_human"] else "")


def print_flywheel(fly):
    print(f"{'turn':>4} {'labeled':>8} {'spend $':>9} {'test acc':>9} {'macro-F1':>9} {'escalation':>11} {'$/1k':>9}")
    for t in fly["turns"]:
        print(f"{t['turn']:>4} {t['n_labeled']:>8} {t['spend_usd']:>9.4f} {t['accuracy']:>9.4f} {t['macro_f1']:>9.4f} "
              f"{t['escalation_rate']:>11.3f} {t['cost_per_1k_usd']:>9.4f}")



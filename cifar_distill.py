"""cifar_distill: an LLM data flywheel. A vision LLM labels images once, a MobileNetV3-Small student
learns from those labels, and a confidence cascade serves traffic (student -> LLM -> human). Every
escalation is logged and fed back as targeted relabeling.

A first run, offline, on real images (scikit-learn's digits), SIMULATED teacher and human, ~1 minute:
    uv run cifar_distill.py --demo
The whole pipeline (needs OPENROUTER_API_KEY in the environment or .env):
    uv run cifar_distill.py --step all
The whole pipeline offline, with the simulated (oracle) teacher and a simulated human:
    uv run cifar_distill.py --step all --teacher oracle --oracle_noise 0.1 --simulate_human --weights none
Rerun any of these: a step whose inputs and settings are unchanged does nothing (--force runs it anyway).

One step at a time (each reads and writes only under --out_dir, default cifar5_run):
    uv run cifar_distill.py --step prep                      # CIFAR-100 -> images/, manifest.csv
    uv run cifar_distill.py --step label --task task.toml --dry_run  # the exact prompt, the calls, the cost
    uv run cifar_distill.py --step label --max_usd 2         # -> review_labels.csv: answer its rows that wait
    uv run cifar_distill.py --step train --epochs 30         # artifacts/{last,best}.pt, mobilenet.pt
    uv run cifar_distill.py --step eval                      # artifacts/eval.json, test_predictions.csv
    uv run cifar_distill.py --step cascade                   # escalations.jsonl, artifacts/cascade.json
    uv run cifar_distill.py --step flywheel --turns 2        # artifacts/turn_<k>/, flywheel.json
    uv run cifar_distill.py --step export                    # artifacts/mobilenet.onnx, mobilenet.ts
    uv run cifar_distill.py --step report                    # report.md, datacard.md
Serve the promoted student (student -> LLM -> person), and answer what it escalated to a person:
    uv run cifar_distill.py --step serve --port 8000         # POST /v1/classify, GET /health, /metrics
    open http://127.0.0.1:8000/review                        # one click or key press per label
    uv run cifar_distill.py --step flywheel --turns 1000 --min_new 200  # beside it (cron), then
    uv run cifar_distill.py --step export                    # the promoted turn ships live
Your own images (DIR/train/<class>/*, DIR/test/<class>/*):
    uv run cifar_distill.py --step all --dataset folder --data_root DIR --out_dir my_run
Past one machine: label in parts, merge, then train on N processes (GPUs, or CPU with gloo):
    uv run cifar_distill.py --step label --shard 0/2         # on machine 0 (1/2 on machine 1)
    uv run cifar_distill.py --step merge                     # labels.shard-*.jsonl copied here -> labels.jsonl
    uv run cifar_distill.py --step label                     # review files from the merged ledger
    uv run torchrun --nproc_per_node 2 cifar_distill.py --step train

Measured results live in each run's report.md (every number there is read from the run's artifacts);
blog.md lists the figures this project measured and the command and machine behind each.
"""
import json
import logging
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import uvicorn
from dotenv import find_dotenv, load_dotenv

from flywheel import FlywheelError, cli
from flywheel.cascade import EscalationLog
from flywheel.data import write_digits_folder
from flywheel.evaluate import evaluate
from flywheel.export import check_export, export_student, ort_session
from flywheel.io import RunLock, SigtermAsInterrupt, read_csv, read_json, write_csv, write_json
from flywheel.labeling import QC, QC_DEFAULTS, Budget, BudgetStop, GoldGateError, label_all, label_items, label_sample, shard_of
from flywheel.labelmodel import LabelModel
from flywheel.ledger import Ledger, merge_ledger_file
from flywheel.ood import fit_ood_both
from flywheel.prep import (CIFAR5, class_counts, drop_cross_split_duplicates, listing, make_images, prep_jobs,
                           JPEG_QUALITY, MANIFEST_FIELDS)
from flywheel.remap import WithCarried, carry_label_map, parse_label_map
from flywheel.relabel import doubt_threshold, paid_labels, pick_relabels, production_labels, turn_evidence, turn_labels
from flywheel.report import print_cascade, print_eval_table, print_flywheel, write_report
from flywheel.review import HUMAN_FIELDS, check_review_file, human_answers, write_label_outputs
from flywheel.routing import CascadeIO, open_human_rows, route_turn, teacher_accuracy
from flywheel.run import (Paths, run_classes, run_task, fingerprint, item, load_manifest, pool_rows, prep_sharpens,
                          promoted, record_promotion, split_of, step_files, unchanged, write_stamp)
from flywheel.service import SWAP_CHECK_S, Service, build_app, load_served
from flywheel.student import ARCH, RECIPES, STUDENTS, pick_device, start_distributed
from flywheel.teacher import SYSTEM_PROMPT, FatalTeacherError, LLMTeacher, OracleTeacher, build_prompt, oracle_model_name
from flywheel.training import count_by, retrain, train_turn, warn_if_turn0_retrained
from flywheel.turns import add_turn, load_turns, other_turns_labels, turn_entry, write_turn_labels

log = logging.getLogger("cifar_distill")

# ----------------------------------------------------------------------------- config
STEPS = ["prep", "label", "train", "eval", "cascade", "flywheel", "export", "report"]
SERVICE_STEPS = ["serve"]  # long-running: never part of --step all
TOOL_STEPS = ["merge"]      # run by hand: merge sharded label ledgers

# name: (type, default, help). argparse is built from this one table; help gets "(default: ...)".
# A default of None means "unset"; the help says what unset means.
OPTION_GROUPS = {
    "general": {
        "step": (str, "all", "pipeline step to run: " + "|".join(STEPS + ["all"] + SERVICE_STEPS + TOOL_STEPS)),
        "out_dir": (str, "cifar5_run", "run folder; every step reads and writes only under it"),
        "seed": (int, 0, "seed for sampling, splits, oracle noise and training"),
        "log_level": (str, "INFO", "logging level: DEBUG shows every retry decision"),
        "demo": (bool, False, "the whole pipeline offline on scikit-learn's handwritten digits (real 8x8 scans, shipped "
                              "with the package) with the SIMULATED oracle teacher and human, no key, no download; "
                              "implies --out_dir demo_run unless given, and settings that finish in minutes on 2 cores"),
        "force": (bool, False, "run a step even when its inputs and settings are unchanged since its last run"),
    },
    "prep": {
        "dataset": (str, "cifar100", "data source: cifar100 (official archive) | folder (DIR/{train,test}/<class>/*)"),
        "data_root": (str, "data", "where the CIFAR-100 archive lives (downloaded if missing), or the image folder"),
        "classes": (str, None, f"comma-separated class names (unset: {CIFAR5} for cifar100, every subfolder for folder)"),
        "max_per_class": (int, 0, "images per class and split, 0 = all (CIFAR-100: 500 train, 100 test)"),
        "img_size": (int, 224, "side of the saved square JPEGs in pixels; the student trains at this size"),
        "no_sharpen": (bool, False, "turn off the unsharp mask applied after bicubic upscaling"),
    },
    "label (teacher)": {
        "teacher": (str, "llm", "llm (OpenAI-compatible API) | oracle (SIMULATED: ground truth + noise, no key)"),
        "oracle_noise": (float, 0.1, "oracle teacher only: fraction of deliberately wrong labels"),
        "llm_base_url": (str, "https://openrouter.ai/api/v1", "OpenAI-compatible base URL (OpenAI, vLLM, Ollama, LM Studio...)"),
        "llm_model": (str, "google/gemini-2.5-flash", "teacher model name sent to the API"),
        "task": (str, None, "a task spec (TOML: description, [classes] name = definition, optional [examples] few-shot "
                            "images, [settings]); the prompt is built from it and its hash keys the ledger; later steps "
                            "reuse the one the label step recorded (unset: that, or the built-in prompt)"),
        "max_label": (int, 1500, "training images the teacher labels (random sample drawn with --seed), gold items included"),
        "conf_thresh": (float, QC_DEFAULTS["conf_thresh"], "always/adaptive QC: accept when both passes agree and their mean confidence is at least this"),
        "second_pass": (str, QC_DEFAULTS["second_pass"], "model (a label model fitted on gold from every signal: accept, ask once more where it can change the decision, or review) | "
                                       "fitted (the previous rule: a stated-confidence threshold) | always | adaptive (below --adaptive_thresh)"),
        "target_label_precision": (float, 0.85, "model/fitted QC: the labels it accepts must reach this accuracy on gold pins at the lower 95%% bound"),
        "min_yield": (float, 0.75, "model QC: when no rule reaches --target_label_precision, the best accepted accuracy at least this share accepted"),
        "logprobs": (str, "auto", "ask for the label token's log-probability, a label-model signal (auto: dropped for the run on a 400 | off)"),
        "confident_learning": (str, "on", "model/fitted QC: a held-out model of the first answers scores each label without having seen it (on | off)"),
        "second_model": (str, None, "model that answers the second pass, through the same endpoint (unset: --llm_model again)"),
        "adaptive_thresh": (float, QC_DEFAULTS["adaptive_thresh"], "adaptive mode: first-pass confidence below which the second pass is made"),
        "audit_frac": (float, QC_DEFAULTS["audit_frac"], "adaptive mode: random fraction of confident items that still get a second pass"),
        "second_temp": (float, QC_DEFAULTS["second_temp"], "sampling temperature of the second pass (the first uses 0)"),
        "max_workers": (int, 10, "teacher requests in flight"),
        "max_retries": (int, 5, "retries per call for timeouts, connection errors, 408/409/429/5xx"),
        "max_invalid": (int, QC_DEFAULTS["max_invalid"], "re-asks for a reply that is not valid JSON with one of the classes"),
        "timeout": (float, 60.0, "seconds per teacher request"),
        "max_usd": (float, 5.0, "hard budget in USD for all teacher spend recorded in labels.jsonl"),
        "dry_run": (bool, False, "print how many calls the label step would make and their estimated cost, then exit"),
        "usd_per_call": (float, 0.0002, "price estimate per call, used by --dry_run and the oracle's simulated cost"),
        "usd_per_mtok_in": (float, 0.30, "USD per million prompt tokens, used only when the server reports no cost"),
        "usd_per_mtok_out": (float, 2.50, "USD per million completion tokens, used only when the server reports no cost"),
        "gold_csv": (str, None, "hand-checked path,label rows labeled first as a prompt check (unset: use --gold_n)"),
        "label_map": (str, None, "old=new,... after a class rename or merge: the ledger's answers to the earlier class list "
                                 "become answers to these classes at no cost, with the map in their provenance (unset: none)"),
        "shard": (str, None, "label: I/N labels only part I of N disjoint parts of the sample (I from 0; parts by image "
                             "hash) into labels.shard-I-of-N.jsonl, for N machines; then --step merge and a plain --step "
                             "label (unset: the whole sample)"),
        "gold_n": (int, 0, "gold items drawn from the sample with manifest labels as stand-in checks; 0 = no gate"),
        "min_gold_acc": (float, 0.8, "stop before labeling the rest when the teacher's gold accuracy is below this"),
    },
    "train": {
        "student": (str, ARCH, "the student: mobilenet_v3_small (torchvision) | efficientnet_lite0 (timm; its ImageNet "
                               "weights install with the package, so --weights imagenet needs no download)"),
        "recipe": (str, RECIPES[0], "training recipe: augment (augmentation, label smoothing, BatchNorm statistics "
                                    "recomputed each epoch) | lpft (a linear probe on the frozen backbone, then augment "
                                    "with the backbone at a tenth of --lr; measured worse) | plain (the control: flips only)"),
        "weights": (str, "imagenet", "student init: imagenet (mobilenet_v3_small: torchvision's IMAGENET1K_V1, from torch's "
                                     "cache or downloaded; efficientnet_lite0: installed) | none | path to a checkpoint"),
        "device": (str, "auto", "auto (cuda, then mps, then cpu) | cpu | cuda | mps"),
        "epochs": (int, 30, "training epochs"), "batch_size": (int, 128, "training and inference batch size"),
        "lr": (float, 2e-3, "AdamW peak learning rate (cosine schedule to 0)"),
        "weight_decay": (float, 0.05, "AdamW weight decay"),
        "val_frac": (float, 0.1, "fraction of labeled training images held out (stratified) for model selection"),
        "calibrate_on": (str, "auto", "the temperature, tau, promotion's NLL, drift reference: auto (the gold pins, a uniform sample "
                                      "with true labels kept out of training, when 30+; else validation) | validation"),
        "resume": (bool, False, "continue an interrupted training run from artifacts/last.pt"),
        "label_weights": (str, "model", "model (a teacher label weighs its label-model probability of being right) | none (hard labels)"),
        "measure_noise_cost": (bool, False, "also train on the manifest's ground-truth labels of the same images, to report in "
                                            "eval.json what label noise costs the student (measuring only; doubles training)"),
        "num_threads": (int, 0, "torch CPU threads, 0 = torch's default"),
    },
    "serve": {
        "host": (str, "127.0.0.1", "serve: address to listen on (0.0.0.0 exposes it to the network)"),
        "port": (int, 8000, "serve: TCP port"), "max_upload_mb": (float, 10.0, "serve: larger uploads get HTTP 413"),
        "max_escalations": (int, 16, "serve: escalations in flight at once; beyond it an upload gets the student's guess "
                                     "with needs_review true at once"),
    },
    "cascade and flywheel": {
        "tau": (float, None, "cascade and serve: the student's confidence threshold, fixed by hand in (0, 1] (unset: "
                             "fitted on validation by --target_precision or --escalation_budget)"),
        "target_precision": (float, 0.95, "cascade: lowest student threshold whose auto-accepted validation precision reaches this"),
        "escalation_budget": (float, None, "cascade: escalate at most this fraction instead (unset: use --target_precision)"),
        "contest_below": (float, 0.5, "cascade and serve: an accepted LLM label whose probability of being right, the "
                                      "student's calibrated probabilities combined with the teacher's accuracy on gold pins, "
                                      "is below this goes to a person (0 = the LLM's label always stands, the original rule)"),
        "simulate_human": (bool, False, "answer human-review items from ground truth (SIMULATED, offline evaluation only)"),
        "relabel_n": (int, 200, "flywheel: pool items relabeled per turn"),
        "relabel_strategy": (str, "targeted", "flywheel: targeted (only picks that can yield a label: a person's answers, "
                                              "then a seeded sample of never-asked items) | random (the control) | margin (lowest margin)"),
        "paid_answers": (str, "on", "flywheel: on (pool answers the cascade already paid for and the student's probabilities "
                                    "support train the next student at no new cost; picks go elsewhere) | off"),
        "pseudo_labels": (str, "off", "flywheel: on (never-asked pool items the student takes itself, at or above tau, train "
                                      "on its own label for that turn: source pseudo, no spend) | off"),
        "turns": (int, 1, "flywheel: number of turns the run should have (completed turns are skipped)"),
        "flywheel_epochs": (int, None, "flywheel: epochs per retrain (unset: --epochs)"),
        "min_new": (int, 0, "flywheel: start a turn only once serving has logged this many new settled answers (a QC-"
                            "accepted LLM label or a person's) since the last turn; with a large --turns, a cron line"),
        "retrain": (str, "best", "flywheel: continue (from the previous student) | scratch (from turn 0's init) | best (train "
                                 "both, keep the better on validation; twice the training)"),
        "from_scratch": (bool, False, "flywheel: same as --retrain scratch"),
    },
}
OPTIONS = {name: spec for group in OPTION_GROUPS.values() for name, spec in group.items()}
# what a newcomer needs, shown first in --help
START_HERE = ["step", "demo", "out_dir", "dataset", "data_root", "classes", "teacher", "llm_model", "max_label",
              "max_usd", "dry_run", "epochs", "weights", "force"]
CHOICES = {"step": STEPS + ["all"] + SERVICE_STEPS + TOOL_STEPS, "dataset": ["cifar100", "folder"], "teacher": ["llm", "oracle"],
           "second_pass": ["model", "fitted", "always", "adaptive"], "confident_learning": ["on", "off"], "logprobs": ["auto", "off"], "relabel_strategy": ["targeted", "random", "margin"],
           "paid_answers": ["on", "off"], "pseudo_labels": ["on", "off"],
           "retrain": ["best", "continue", "scratch"], "student": list(STUDENTS), "label_weights": ["model", "none"], "calibrate_on": ["auto", "validation"], "recipe": list(RECIPES), "device": ["auto", "cpu", "cuda", "mps"],
           "log_level": ["DEBUG", "INFO", "WARNING", "ERROR"]}
# the flags that shape each step's outputs (the others change only speed, logging or where things go): a rerun
# with the same ones and the same files does nothing (flywheel.run stamps)
_ASK = ["classes", "task_digest", "seed", "teacher", "oracle_noise", "llm_base_url", "llm_model", "second_model", "second_pass",
        "conf_thresh", "target_label_precision", "min_yield", "confident_learning", "adaptive_thresh", "audit_frac", "second_temp",
        "max_invalid", "max_usd"]
_FIT = ["classes", "seed", "student", "recipe", "weights", "label_weights", "epochs", "batch_size", "lr", "weight_decay", "val_frac", "calibrate_on", "measure_noise_cost"]
_ROUTE = ["tau", "target_precision", "escalation_budget", "contest_below", "simulate_human"]
SHAPED_BY = {"prep": ["dataset", "classes", "max_per_class", "img_size", "no_sharpen"],
             "label": _ASK + ["max_label", "gold_csv", "gold_n", "min_gold_acc", "label_map"],
             "train": _FIT, "eval": [], "cascade": _ASK + _ROUTE,
             "flywheel": _ASK + _ROUTE + _FIT + ["relabel_n", "relabel_strategy", "paid_answers", "pseudo_labels",
                                                 "turns", "flywheel_epochs", "retrain", "from_scratch"],
             "export": ["no_sharpen"], "report": []}
UNIT_INTERVAL = ["contest_below", "oracle_noise", "conf_thresh", "adaptive_thresh", "audit_frac", "min_gold_acc",
                 "target_precision", "target_label_precision", "min_yield"]
POSITIVE = ["img_size", "max_escalations", "max_workers", "epochs", "batch_size", "lr", "timeout", "relabel_n", "turns"]
NON_NEGATIVE = ["min_new", "max_per_class", "max_label", "max_retries", "max_invalid", "max_usd", "usd_per_call",
                "usd_per_mtok_in", "usd_per_mtok_out", "gold_n", "weight_decay", "second_temp", "num_threads"]


def build_parser():
    return cli.build_parser(OPTION_GROUPS, START_HERE, CHOICES, __doc__.split("\n\n")[0])


# --demo: a first run with nothing to download and no key (flags given on the command line still win)
DEMO = {"out_dir": "demo_run", "dataset": "folder", "teacher": "oracle", "oracle_noise": 0.15, "simulate_human": True,
        "weights": "none", "img_size": 32, "epochs": 12, "batch_size": 64, "max_label": 600, "gold_n": 40,
        "relabel_n": 150, "turns": 1, "retrain": "continue"}
API_KEY_ENV = "OPENROUTER_API_KEY"
EXIT_NO_KEY, EXIT_TEACHER_FATAL, EXIT_GOLD_GATE, EXIT_BUDGET, EXIT_INTERRUPTED = 2, 3, 4, 5, 130
NO_KEY_MESSAGE = (
    f"error: {API_KEY_ENV} is not set. Put it in the environment (export {API_KEY_ENV}=...) or in a .env file "
    f"in the folder you run from (a line {API_KEY_ENV}=...). To run with no key: --teacher oracle "
    f"--oracle_noise 0.1 (a SIMULATED teacher), or --dry_run to price the job, or point --llm_base_url at a "
    f"local OpenAI-compatible server (vLLM, Ollama, LM Studio) and set the variable to any non-empty value.")
# pipeline steps that rewrite the run's outputs: one at a time per folder (run.lock). Serving takes no lock: it
# shares the ledger (a claim per key, one budget), escalations.jsonl (flocked appends) and human_review.csv
# (a file lock) with whichever of these runs beside it
SPENDING_STEPS = ("label", "cascade", "flywheel", "all", "merge")


def bad(flag, why):
    raise SystemExit(f"error: --{flag} {why}")


def validate(cfg: dict) -> dict:
    """Fail before any work, naming the flag. Returns cfg with derived fields filled in."""
    cli.check_ranges(cfg, UNIT_INTERVAL, POSITIVE, NON_NEGATIVE, {k: spec[1] for k, spec in OPTIONS.items()})
    for k, ok, want in (("val_frac", 0.0 < cfg["val_frac"] < 0.5, "in (0, 0.5)"),
                        ("tau", cfg["tau"] is None or 0.0 < cfg["tau"] <= 1.0, "in (0, 1]"),
                        ("escalation_budget", cfg["escalation_budget"] is None or 0.0 <= cfg["escalation_budget"] <= 1.0, "in [0, 1]"),
                        ("flywheel_epochs", cfg["flywheel_epochs"] is None or cfg["flywheel_epochs"] > 0, "> 0"),
                        ("port", 0 <= cfg["port"] <= 65535, "a TCP port in 0-65535"),
                        ("max_upload_mb", cfg["max_upload_mb"] > 0, "> 0")):
        if not ok:
            bad(k, f"must be {want}, got {cfg[k]}")
    if cfg["weights"] not in ("imagenet", "none") and not Path(cfg["weights"]).is_file():
        bad("weights", f"must be imagenet, none or an existing checkpoint file; {cfg['weights']!r} is none of these")
    if cfg["gold_csv"] and not Path(cfg["gold_csv"]).is_file():
        bad("gold_csv", f"file {cfg['gold_csv']!r} does not exist")
    if cfg["second_model"] and cfg["teacher"] == "oracle":
        bad("second_model", "needs --teacher llm (the oracle has one simulated model)")
    if not cfg["llm_base_url"].startswith(("http://", "https://")):
        bad("llm_base_url", f"must start with http:// or https://, got {cfg['llm_base_url']!r}")
    cli.check_processes(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    cfg["classes"] = run_classes(cfg)
    cfg["task_spec"] = run_task(cfg)
    cfg["task_digest"] = cfg["task_spec"].digest if cfg["task_spec"] else None  # the stamps see an edited spec
    cfg["label_map"] and parse_label_map(cfg["label_map"], cfg["classes"])  # a mistyped pair fails here, named
    if (cfg["teacher"] == "llm" and not cfg["dry_run"] and cfg["step"] in ("label", "cascade", "flywheel", "all", "serve")
            and not api_key()):
        print(NO_KEY_MESSAGE, file=sys.stderr)
        raise SystemExit(EXIT_NO_KEY)
    return cfg


# ----------------------------------------------------------------------------- the wiring of teacher, QC and budget

def api_key() -> str:
    return os.environ.get(API_KEY_ENV, "").strip()


def teacher_model_name(cfg):
    return oracle_model_name(cfg["oracle_noise"]) if cfg["teacher"] == "oracle" else cfg["llm_model"]


def make_teacher(cfg, manifest):
    """The LLM client (validate checked the key), or the SIMULATED oracle."""
    if cfg["teacher"] == "oracle":
        truth = {p: r["label"] for p, r in manifest.items()}
        return OracleTeacher(truth, cfg["classes"], cfg["oracle_noise"], cfg["usd_per_call"], cfg["seed"])
    return LLMTeacher(cfg["llm_base_url"], cfg["llm_model"], api_key(), cfg["classes"], timeout=cfg["timeout"],
                      max_retries=cfg["max_retries"], usd_per_mtok_in=cfg["usd_per_mtok_in"],
                      usd_per_mtok_out=cfg["usd_per_mtok_out"], logprobs=cfg["logprobs"] == "auto", task=cfg["task_spec"])


def make_qc(cfg, P=None):
    """The QC policy; with P, the rule the label step fitted on gold too, so cascade and flywheel judge answers alike."""
    qc = QC(cfg["classes"], **{k: cfg[k] for k in QC_DEFAULTS}, seed=cfg["seed"], second_model=cfg["second_model"])
    qc.task = cfg["task_spec"]
    if P is not None and P.label_summary.exists():
        t = (read_json(P.label_summary).get("qc_rule") or {}).get("threshold")
        qc.threshold = float("inf") if t is None else float(t)
    if P is not None and P.label_flags.exists() and cfg["second_pass"] == "fitted":
        qc.flagged = {r["sha256"] for r in read_csv(P.label_flags)}
    if P is not None and P.label_model.exists() and cfg["second_pass"] == "model":
        qc.label_model = LabelModel.from_json(read_json(P.label_model))
    return qc


def make_budget(cfg, ledger):
    """Every call is reserved at the higher of --usd_per_call and the dearest call this model has cost."""
    return Budget(cfg["max_usd"], ledger.total_now(), cfg["usd_per_call"],
                  known_price=ledger.max_cost_per_call(teacher_model_name(cfg)), ledger=ledger)


# ----------------------------------------------------------------------------- prep

def step_prep(cfg, P):
    """CIFAR-100 (or an image folder) -> OUT/images/{train,test}/<class>/<class>_<NNNNN>.jpg + manifest.csv.

    Idempotent: an image made with the same settings is kept; a change of --img_size or sharpening
    regenerates every image (prep.json records the settings the images were made with).
    """
    classes = cfg["classes"]
    settings = {"dataset": cfg["dataset"], "img_size": cfg["img_size"], "sharpen": not cfg["no_sharpen"],
                "jpeg_quality": JPEG_QUALITY}
    old = read_json(P.prep_json) if P.prep_json.exists() else None
    if old is not None and old.get("settings") != settings:
        log.info("prep settings changed (%s -> %s): regenerating every image", old.get("settings"), settings)
        shutil.rmtree(P.images, ignore_errors=True)
    jobs = prep_jobs(cfg["dataset"], cfg["data_root"], classes, cfg["max_per_class"] or None)
    m = make_images(P.out, jobs, settings["img_size"], settings["sharpen"])
    if not m.rows:
        raise SystemExit(f"error: prep found no images for classes {classes} under {cfg['data_root']}")
    rows, dups = drop_cross_split_duplicates(m.rows)
    if dups:
        log.warning("prep: %d training image(s) are byte-identical to a test image and are kept out of training "
                    "(listed in %s): %s", len(dups), P.prep_json, listing(d["train"] for d in dups))
    write_csv(P.manifest, MANIFEST_FIELDS, rows)
    write_json(P.classes, classes)
    counts = class_counts(rows, classes)
    write_json(P.prep_json, {"settings": settings, "classes": classes, "counts": counts, "made": m.made,
                             "kept": m.kept, "skipped": m.skipped, "cross_split_duplicates": dups,
                             "source": str(cfg["data_root"])})
    if m.skipped:
        log.warning("prep skipped %d unreadable file(s): %s", len(m.skipped), listing((s["file"] for s in m.skipped), 10))
    log.info("prep: %d images (%d made, %d already there) -> %s; manifest -> %s; per split/class %s",
             len(rows), m.made, m.kept, P.images, P.manifest, json.dumps(counts))
    return counts


# ----------------------------------------------------------------------------- label

def step_label(cfg, P):
    """Sampled training images -> teacher (dual pass, QC) -> labels.jsonl -> review CSVs + summary."""
    manifest, qc = load_manifest(P), make_qc(cfg)
    carried = carry_label_map(P, manifest, qc, teacher_model_name(cfg), cfg["label_map"], cfg["dry_run"])
    sample, gold = label_sample(manifest, cfg["seed"], cfg["max_label"], cfg["classes"], cfg["gold_csv"], cfg["gold_n"],
                                first=carried.answered)  # images a --label_map answered come first: no new call
    n_train = sum(r["split"] == "train" for r in manifest.values())
    if len(sample) >= n_train:
        log.warning("label: --max_label %d covers all %d training images, so no pool will be left for the cascade's "
                    "pool split and the flywheel; use --max_label below %d to keep one", cfg["max_label"], n_train, n_train)
    ledger_path = P.ledger
    if cfg["shard"]:
        sample, gold = shard_of(sample, gold, manifest, cfg["shard_i"], cfg["shard_n"])
        ledger_path = P.shard_ledger(cfg["shard_i"], cfg["shard_n"])
        log.info("label: shard %s: %d of the sample's images (%d gold) -> %s", cfg["shard"], len(sample), len(gold),
                 ledger_path)
    items = [item(P, manifest, p) for p in sample]
    qc.always_second = {it["sha256"] for it in items if it["path"] in gold}
    with Ledger(ledger_path) as ledger:
        if cfg["dry_run"]:
            return print_dry_run(cfg, items, gold, WithCarried(ledger, carried.records), qc, cfg["label_map"] and carried)
        if cfg["task_spec"] is not None:
            write_json(P.task, cfg["task_spec"].record())  # later steps ask the same question (run_task)
        check_review_file(P)
        with make_teacher(cfg, manifest) as teacher:
            budget = make_budget(cfg, ledger)
            if cfg["shard"]:  # a part's review files would describe a part: the merged ledger's plain label run writes them
                def outputs(**_):
                    log.info("label: shard %s stopped or done: %d calls, $%.4f in %s. Copy it into the main run "
                             "folder, run --step merge, then --step label without --shard.", cfg["shard"],
                             budget.calls, budget.run_spent, ledger_path)
            else:
                def outputs(gold_report=None, rule=None, **kw):
                    gold_report = gold_report and {**gold_report, "simulated": not cfg["gold_csv"]}
                    return write_label_outputs(P, items, ledger, teacher, manifest, gold_report, qc, cfg["max_usd"],
                                               gold, rule=rule, **kw)  # a person's (or --gold_n's SIMULATED) check
            summary = label_all(cfg, P, items, gold, teacher, ledger, qc, budget, outputs)
    if budget.stopped:
        raise BudgetStop(f"budget stop: --max_usd {cfg['max_usd']} is spent (${budget.spent:.4f} recorded in "
                         f"{ledger_path.name}); the answers paid for are kept. Raise --max_usd and rerun to label the rest.")
    return summary


def print_dry_run(cfg, items, gold, ledger, qc, carried=None):
    t = cfg["task_spec"]
    if carried:
        print(f"--label_map: {len(carried.records)} earlier answer(s) to {list(carried.earlier)} carry over at no cost" if carried.earlier
              else "--label_map: no earlier class list maps onto these classes (one was added): 0 earlier answer(s) carry over")
    print(f"the prompt ({'task spec ' + t.path if t else 'built in'}), first pass:\n--- system\n{SYSTEM_PROMPT}\n--- user\n"
          f"{build_prompt(cfg['classes'], t)}\n--- then {sum(map(len, t.examples.values())) if t else 0} example image(s), "
          f"then the photo\n")
    lo, hi = qc.calls_needed(items, teacher_model_name(cfg), ledger)
    print(f"dry run: {len(items)} images ({len(gold)} gold), {lo}-{hi} calls still needed "
          f"({'second pass only where QC needs it: the upper bound assumes every image does' if lo != hi else 'two passes each'}), "
          f"estimated ${lo * cfg['usd_per_call']:.4f}-${hi * cfg['usd_per_call']:.4f} at "
          f"--usd_per_call {cfg['usd_per_call']}; already spent ${ledger.total_cost():.4f} of --max_usd "
          f"{cfg['max_usd']}. No call was made.")
    over = ledger.total_cost() + hi * cfg["usd_per_call"] - cfg["max_usd"]
    if over > 0:
        print(f"warning: the estimate is up to ${over:.4f} over --max_usd {cfg['max_usd']}: the label step would "
              f"stop at the budget (exit {EXIT_BUDGET}) with part of the sample unlabeled; raise --max_usd to "
              f"{cfg['max_usd'] + over:.4f} or lower --max_label", file=sys.stderr)


def step_merge(cfg, P):
    """OUT/labels.shard-*.jsonl (copied here from the machines that labeled them) -> appended to labels.jsonl.

    Every call a shard paid for is kept, except an answer to a key labels.jsonl already answers, so no key
    has two answers. labels_merge.json remembers how far each shard file was merged: a rerun, or a shard
    that grew since, adds only what is new. Then `--step label` (no --shard) writes the review files from
    the merged ledger, asking only what the whole sample's QC rule still needs."""
    shards = P.shard_ledgers()
    if not shards:
        raise SystemExit(f"error: no labels.shard-I-of-N.jsonl in {P.out}; label with --step label --shard I/N on "
                         f"each machine, copy those files here, then rerun --step merge")
    done = read_json(P.label_merge) if P.label_merge.exists() else {}
    with Ledger(P.ledger) as ledger:
        for path in shards:
            r = merge_ledger_file(ledger, path, done.get(path.name))
            done[path.name] = r.state
            write_json(P.label_merge, done)  # after each shard: an interrupted merge resumes where it stopped
            log.info("merge: %s: %d call(s) added, %d answer(s) already in %s skipped, %d bad line(s)", path.name,
                     r.added, r.duplicates, P.ledger.name, r.bad_lines)
        log.info("merge: %s now holds %d calls ($%.4f); next: uv run cifar_distill.py --step label --out_dir %s",
                 P.ledger, len(ledger), ledger.total_cost(), P.out)
    return done


# ----------------------------------------------------------------------------- train and eval

def step_train(cfg, P):
    """review_labels.csv -> artifacts/{last,best}.pt, mobilenet.pt, train_rows.csv (turn 0's student)."""
    device = pick_device(cfg["device"])
    best = train_turn(cfg, P, load_manifest(P), P.turn0, 0, cfg["weights"], cfg["resume"], device)
    if "temperature" in best:  # rank 0 (or the only process) calibrated and wrote it
        warn_if_turn0_retrained(P)
    return best


def step_eval(cfg, P):
    """Turn 0's best.pt + the official test split -> artifacts/eval.json, test_predictions.csv."""
    out = evaluate(P, P.turn0, load_manifest(P), pick_device(cfg["device"]))
    print_eval_table(out, P.turn0)
    return out


# ----------------------------------------------------------------------------- cascade

def cascade_turn(cfg, P, manifest, turn):
    """Route test and pool through turn `turn`'s student with the run's teacher, ledger, QC and budget."""
    T = P.turn(turn)
    with Ledger(P.ledger) as ledger, EscalationLog(P.escalations) as esc, make_teacher(cfg, manifest) as teacher:
        io = CascadeIO(esc, teacher, ledger, make_qc(cfg, P), make_budget(cfg, ledger), open_human_rows(P))
        result = route_turn(cfg, P, manifest, T, turn, io, pick_device(cfg["device"]))
    print_cascade(P, T, result)
    return result


def step_cascade(cfg, P):
    """Route the test split and the unlabeled pool through the promoted student -> LLM -> human.
    -> escalations.jsonl, human_review.csv, <turn>/cascade.json, <turn>/pool_predictions.csv"""
    return cascade_turn(cfg, P, load_manifest(P), promoted(P).turn)


# ----------------------------------------------------------------------------- flywheel

def step_flywheel(cfg, P):
    """Turns 1..--turns: relabel targeted pool items, retrain, recalibrate, re-evaluate, re-run the cascade.
    -> artifacts/turn_<k>/, flywheel_labels.csv, artifacts/flywheel.json"""
    manifest, device = load_manifest(P), pick_device(cfg["device"])
    fly = load_turns(P)
    if not fly["turns"]:
        if not P.turn0.cascade.exists():
            cascade_turn(cfg, P, manifest, 0)
        P.need(P.turn0.eval, "eval")
        add_turn(P, fly, turn_entry(P, P.turn0, 0))
        record_promotion(P)
    done = {t["turn"] for t in fly["turns"]}
    for k in range(1, cfg["turns"] + 1):
        if k in done:
            log.info("flywheel turn %d already done (see %s); raise --turns for more", k, P.flywheel)
            continue
        if waiting_for_serving(cfg, P, manifest, k):
            break
        if not pool_rows(P, manifest, k - 1):
            log.info("flywheel turn %d skipped: no unlabeled training images are left to relabel (every one is "
                     "labeled already); label fewer (--max_label) or add images to grow the pool", k)
            break
        prev, T = P.turn(k - 1), P.turn(k)
        if not prev.cascade.exists():
            cascade_turn(cfg, P, manifest, k - 1)
        entry = relabel_turn(cfg, P, manifest, prev, k)
        entry["retrain"] = retrain(cfg, P, manifest, prev, T, k, device)
        assert all(split_of(manifest, r["path"]) in ("train", "production") for r in read_csv(T.train_rows)), \
            "a test image entered training"
        evaluate(P, T, manifest, device)
        cascade_turn(cfg, P, manifest, k)
        add_turn(P, fly, {**turn_entry(P, T, k), **entry})
        log.info("flywheel: promoted student is turn %d (best validation accuracy)", record_promotion(P).turn)
    print_flywheel(fly)
    return fly


def waiting_for_serving(cfg, P, manifest, k) -> bool:
    """--min_new: whether turn k waits for more settled answers from serving (and says so)."""
    if not cfg["min_new"]:
        return False
    n = len(production_labels(P, manifest, cfg["classes"], k, {r["path"] for r in other_turns_labels(P, k)}))
    if n < cfg["min_new"]:
        log.info("flywheel turn %d not started: serving has logged %d new settled answer(s) since the last turn, "
                 "fewer than --min_new %d; nothing to do", k, n, cfg["min_new"])
    return n < cfg["min_new"]


def relabel_turn(cfg, P, manifest, prev, k) -> dict:
    """Turn k's new labels from the previous student's pool evidence -> flywheel_labels.csv; what they cost."""
    ev = turn_evidence(P, prev)
    doubt_below = doubt_threshold(cfg["contest_below"])
    # answers the cascade already paid for train at no new cost; the picks go to items without one
    paid = paid_labels(ev.pool, ev.escalations, ev.classes, ev.teacher_acc, doubt_below) \
        if cfg["paid_answers"] == "on" else {}
    humans = human_answers(P)
    people = [p for p, a in humans.items() if a.source != "simulated_human"]
    picked, why = pick_relabels([r for r in ev.pool if r["path"] not in paid], ev.escalations, cfg["relabel_n"],
                                cfg["relabel_strategy"], people, cfg["seed"] + k, ev.classes, ev.teacher_acc,
                                doubt_below=doubt_below)
    assert all(manifest[p]["split"] == "train" for p in picked), "flywheel picked a test image"
    with Ledger(P.ledger) as ledger, make_teacher(cfg, manifest) as teacher:
        budget, spent0 = make_budget(cfg, ledger), ledger.total_cost()
        verdicts = label_items([item(P, manifest, p) for p in picked], teacher, ledger, make_qc(cfg, P), budget,
                               "flywheel", cfg["max_workers"], f"flywheel turn {k} relabel")
        # what the picked items' answers cost, whether this turn or the cascade before it paid for them
        picked_usd = ledger.cost_of({manifest[p]["sha256"] for p in [*picked, *paid]})
    new = turn_labels(k, cfg["classes"], picked, verdicts, paid, ev, humans, cfg["pseudo_labels"] == "on",
                      str(P.human_review))
    old = other_turns_labels(P, k)
    served = production_labels(P, manifest, cfg["classes"], k, {r["path"] for r in old} | {r.path for r in new.all()})
    write_turn_labels(P, old, new.all() + served)
    n_new, relabel_usd = len(new.all()) + len(served), budget.spent - spent0
    log.info("flywheel turn %d: %d pool answer(s) the cascade already paid for; picked %d pool items %s; "
             "%d label(s) in all (%s); relabeling cost $%.4f; budget stop: %s", k, len(paid), len(picked), why, n_new,
             json.dumps(count_by([r._asdict() for r in new.all() + served], "source")), relabel_usd, budget.stopped)
    return {"new_labels": n_new, "paid_labels": len(paid), "picks_labeled": len(new.picks),
            "serving_labels": len(served), "pseudo_labels": len(new.pseudo),
            "picked": why, "relabel_strategy": cfg["relabel_strategy"], "relabel_usd": round(relabel_usd, 6),
            "picked_answers_usd": round(picked_usd, 6),
            "labels_per_usd": round((n_new - len(new.pseudo)) / picked_usd, 1) if picked_usd > 0 else None}


# ----------------------------------------------------------------------------- export, report

def step_export(cfg, P):
    """The promoted best.pt -> artifacts/mobilenet.onnx and mobilenet.ts (raw uint8 pixels in, preprocessing
    inside the graph, calibrated logits out), export.json (each checked against PyTorch on test images), and
    ood.npz (what serving sends to a person unasked)."""
    turn = promoted(P).turn
    T = P.turn(turn)
    result = export_student(P, T, turn, load_manifest(P), prep_sharpens(P, not cfg["no_sharpen"]))
    trained = read_csv(T.train_rows)
    files = {s: [P.out / r["path"] for r in trained if r["split"] == s] for s in ("train", "val", "cal")}
    ood = fit_ood_both(ort_session(P.onnx), files["train"], files["val"] + files["cal"], cfg["seed"])  # features, then pixels
    ood.save(P.ood)
    result["ood"] = {"path": str(P.ood), "bank": len(ood.bank), "threshold": ood.threshold, "quantile": ood.val_quantile, "kind": ood.kind}
    write_json(P.export, result)
    check_export(result, P.export)
    return result


def step_report(cfg, P):
    """Every artifact of the run -> report.md (the promoted turn's plots embedded) and datacard.md."""
    return write_report(P)


# ----------------------------------------------------------------------------- serve

def step_serve(cfg, P):
    """The promoted student in ONNX Runtime behind HTTP (flywheel/service.py): student, then the LLM through
    the label step's ledger, QC and budget, then a person at /review; /metrics and drift in /health. A newly
    exported student is swapped in live. Blocks until Ctrl-C.
    -> production/, escalations.jsonl (split production), human_review.csv"""
    def load():
        return load_served(P, cfg["num_threads"], cfg["tau"], cfg["escalation_budget"], cfg["target_precision"],
                           prep_sharpens(P, not cfg["no_sharpen"]))
    served = load()
    with Ledger(P.ledger) as ledger, EscalationLog(P.escalations) as esc, make_teacher(cfg, load_manifest(P)) as teacher:
        svc = Service(P.out, served, teacher, ledger, make_qc(cfg, P), make_budget(cfg, ledger), esc, HUMAN_FIELDS,
                      int(cfg["max_upload_mb"] * 2**20), teacher_accuracy(P), cfg["contest_below"],
                      cfg["max_escalations"], reload=load)
        svc.watch(SWAP_CHECK_S)
        log.info("serve: turn %d's student on http://%s:%d  (/v1/classify, /health, /metrics, /review); at most %d "
                 "escalations in flight; escalations -> %s", served.turn, cfg["host"], cfg["port"],
                 cfg["max_escalations"], P.escalations)
        try:
            uvicorn.run(build_app(svc), host=cfg["host"], port=cfg["port"], log_level="warning", access_log=False)
        finally:
            svc.write_stats()  # the report's production section counts every request this server answered


# ----------------------------------------------------------------------------- main

STEP_FUNCTIONS = {"prep": step_prep, "label": step_label, "train": step_train, "eval": step_eval,
                  "cascade": step_cascade, "flywheel": step_flywheel, "export": step_export, "report": step_report,
                  "serve": step_serve, "merge": step_merge}
# the package's errors that have their own exit code (README's table); any other FlywheelError (a bad flag
# value among them: cli.UsageError) exits 1
EXIT_CODES = {FatalTeacherError: EXIT_TEACHER_FATAL, GoldGateError: EXIT_GOLD_GATE, BudgetStop: EXIT_BUDGET}


def main(argv=None):
    try:
        run(sys.argv[1:] if argv is None else [str(a) for a in argv])
    except tuple(EXIT_CODES) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_CODES[type(e)]) from None
    except FlywheelError as e:  # a problem the user fixes: the message, not a traceback
        raise SystemExit(f"error: {e}") from None


def configure(argv) -> dict:
    """Flags -> checked settings: logging set up, .env read, the demo's digits written."""
    parser = build_parser()
    if "--demo" in argv:
        parser.set_defaults(**DEMO, data_root=None)
    cfg = vars(cli.parse(parser, argv))
    logging.basicConfig(level=cfg["log_level"], format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if cfg["log_level"] != "DEBUG":  # httpx logs every request at INFO: the progress bar is the output
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)
    load_dotenv(find_dotenv(usecwd=True))  # OPENROUTER_API_KEY may live in ./.env; the environment wins
    if cfg["demo"]:
        cfg["data_root"] = cfg["data_root"] or str(Path(cfg["out_dir"]) / "digits")
        write_digits_folder(cfg["data_root"])
    return validate(cfg)


def run(argv):
    cfg = configure(argv)
    P = Paths(cfg["out_dir"])
    P.out.mkdir(parents=True, exist_ok=True)
    if cfg["num_threads"]:
        torch.set_num_threads(cfg["num_threads"])
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if distributed and start_distributed(cfg["device"])[0] != 0:  # torchrun: rank 0 alone logs progress
        logging.getLogger().setLevel(logging.WARNING)
    # a rerun with unchanged inputs and settings does nothing; a dry run, a shard, a resume or torchrun always run
    stamped = not (cfg["dry_run"] or cfg["shard"] or cfg["resume"] or distributed)
    spends = cfg["step"] in SPENDING_STEPS and not cfg["dry_run"]
    try:
        with SigtermAsInterrupt(), (RunLock(P.out, cfg["step"]) if spends else nullcontext()):
            for s in (STEPS if cfg["step"] == "all" else [cfg["step"]]):
                run_step(s, cfg, P, stamped and s in SHAPED_BY)
                if cfg["step"] == "all" and s == "label" and cfg["dry_run"]:
                    break
    except KeyboardInterrupt:
        # the step already let calls in flight land and rewrote its outputs from what was paid
        print(f"interrupted: stopped step {cfg['step']}; everything paid for is in {P.ledger}, and a rerun of "
              f"the same command resumes without paying twice.", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def run_step(s, cfg, P, stamped):
    """One step, unless its stamp says its inputs and settings are unchanged since its last run."""
    def made_from():
        return fingerprint(step_files(P, s, cfg["data_root"], cfg["gold_csv"]), {k: cfg[k] for k in SHAPED_BY[s]}, P.out)
    last = stamped and not cfg["force"] and unchanged(P, s, made_from())
    if last:
        log.info("=== step %s: inputs and settings unchanged since %s; nothing to do (--force reruns it) ===", s, last["at"])
        return
    t0 = time.time()
    log.info("=== step %s ===", s)
    STEP_FUNCTIONS[s](cfg, P)
    if stamped:
        write_stamp(P, s, made_from())  # after the step: what its outputs were made from
    log.info("=== step %s done in %.1fs ===", s, time.time() - t0)


if __name__ == "__main__":
    main()

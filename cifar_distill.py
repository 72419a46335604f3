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
    uv run cifar_distill.py --step label --dry_run           # how many calls, what it would cost
    uv run cifar_distill.py --step label --max_usd 2         # labels.jsonl -> review_labels.csv
    uv run cifar_distill.py --step train --epochs 30         # artifacts/{last,best}.pt, mobilenet.pt
    uv run cifar_distill.py --step eval                      # artifacts/eval.json, test_predictions.csv
    uv run cifar_distill.py --step cascade                   # escalations.jsonl, artifacts/cascade.json
    uv run cifar_distill.py --step flywheel --turns 2        # artifacts/turn_<k>/, flywheel.json
    uv run cifar_distill.py --step export                    # artifacts/mobilenet.onnx, mobilenet.ts
    uv run cifar_distill.py --step report                    # report.md, datacard.md
Serve the promoted student (student -> LLM -> person), and answer what it escalated to a person:
    uv run cifar_distill.py --step serve --port 8000         # POST /v1/classify, GET /health
    open http://127.0.0.1:8000/review                        # one click or key press per label
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
import random
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

from flywheel import FlywheelError, cli
from flywheel.costs import usd
from flywheel.io import (RunLock, RunLockHeld, atomic_write_bytes, read_csv, read_json, read_jsonl, sha256_file,
                         write_csv, write_json)
from flywheel.run import (Paths, RunError, better_key, fingerprint, promoted, promoted_artifacts, record_promotion,
                          step_files, unchanged, validation_score, write_stamp)

log = logging.getLogger("cifar_distill")

# ----------------------------------------------------------------------------- config
CIFAR5 = "apple,mushroom,orange,pear,sweet_pepper"
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
        "max_label": (int, 1500, "training images the teacher labels (random sample drawn with --seed), gold items included"),
        "conf_thresh": (float, 0.7, "always/adaptive QC: accept when both passes agree and their mean confidence is at least this"),
        "second_pass": (str, "fitted", "fitted (second call only below the confidence threshold fitted on gold pins, plus "
                                       "--audit_frac; every image without gold) | always | adaptive (below --adaptive_thresh)"),
        "target_label_precision": (float, 0.85, "fitted QC: the labels it accepts must reach this accuracy on gold pins at the lower 95%% bound"),
        "confident_learning": (str, "on", "fitted QC with gold: a held-out model trained on the first answers in folds "
                                          "sends the labels it confidently contradicts to review, when gold shows its flags are "
                                          "mostly right (on | off)"),
        "second_model": (str, None, "model that answers the second pass, through the same endpoint (unset: --llm_model again)"),
        "adaptive_thresh": (float, 0.9, "adaptive mode: first-pass confidence below which the second pass is made"),
        "audit_frac": (float, 0.1, "adaptive mode: random fraction of confident items that still get a second pass"),
        "second_temp": (float, 0.7, "sampling temperature of the second pass (the first uses 0)"),
        "max_workers": (int, 10, "teacher requests in flight"),
        "max_retries": (int, 5, "retries per call for timeouts, connection errors, 408/409/429/5xx"),
        "max_invalid": (int, 2, "re-asks for a reply that is not valid JSON with one of the classes"),
        "timeout": (float, 60.0, "seconds per teacher request"),
        "max_usd": (float, 5.0, "hard budget in USD for all teacher spend recorded in labels.jsonl"),
        "dry_run": (bool, False, "print how many calls the label step would make and their estimated cost, then exit"),
        "usd_per_call": (float, 0.0002, "price estimate per call, used by --dry_run and the oracle's simulated cost"),
        "usd_per_mtok_in": (float, 0.30, "USD per million prompt tokens, used only when the server reports no cost"),
        "usd_per_mtok_out": (float, 2.50, "USD per million completion tokens, used only when the server reports no cost"),
        "gold_csv": (str, None, "hand-checked path,label rows labeled first as a prompt check (unset: use --gold_n)"),
        "shard": (str, None, "label: I/N labels only part I of N disjoint parts of the sample (I from 0; parts by image "
                             "hash) into labels.shard-I-of-N.jsonl, for N machines; then --step merge and a plain --step "
                             "label (unset: the whole sample)"),
        "gold_n": (int, 0, "gold items drawn from the sample with manifest labels as stand-in checks; 0 = no gate"),
        "min_gold_acc": (float, 0.8, "stop before labeling the rest when the teacher's gold accuracy is below this"),
    },
    "train": {
        "weights": (str, "imagenet", "student init: imagenet (torchvision IMAGENET1K_V1) | none | path to a checkpoint"),
        "device": (str, "auto", "auto (cuda, then mps, then cpu) | cpu | cuda | mps"),
        "epochs": (int, 30, "training epochs"),
        "batch_size": (int, 128, "training and inference batch size"),
        "lr": (float, 2e-3, "AdamW peak learning rate (cosine schedule to 0)"),
        "weight_decay": (float, 0.05, "AdamW weight decay"),
        "val_frac": (float, 0.1, "fraction of labeled training images held out (stratified) for model selection and calibration"),
        "resume": (bool, False, "continue an interrupted training run from artifacts/last.pt"),
        "measure_noise_cost": (bool, False, "also train on the manifest's ground-truth labels of the same images, to report in "
                                            "eval.json what label noise costs the student (measuring only; doubles training)"),
        "num_threads": (int, 0, "torch CPU threads, 0 = torch's default"),
    },
    "serve": {
        "host": (str, "127.0.0.1", "serve: address to listen on (0.0.0.0 exposes it to the network)"),
        "port": (int, 8000, "serve: TCP port"),
        "max_upload_mb": (float, 10.0, "serve: larger uploads get HTTP 413"),
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
        "relabel_strategy": (str, "targeted", "flywheel: targeted (picks that can yield a label: LLM-student disagreements, "
                                              "then class-balanced low margin) | random (the control) | margin (lowest margin)"),
        "paid_answers": (str, "on", "flywheel: on (pool answers the cascade already paid for and the student's probabilities "
                                    "support train the next student at no new cost; picks go elsewhere) | off"),
        "pseudo_labels": (str, "off", "flywheel: on (never-asked pool items the student takes itself, at or above tau, train "
                                      "on its own label for that turn: source pseudo, no spend) | off"),
        "turns": (int, 1, "flywheel: number of turns the run should have (completed turns are skipped)"),
        "flywheel_epochs": (int, None, "flywheel: epochs per retrain (unset: --epochs)"),
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
           "second_pass": ["fitted", "always", "adaptive"], "confident_learning": ["on", "off"], "relabel_strategy": ["targeted", "random", "margin"],
           "paid_answers": ["on", "off"], "pseudo_labels": ["on", "off"],
           "retrain": ["best", "continue", "scratch"], "device": ["auto", "cpu", "cuda", "mps"],
           "log_level": ["DEBUG", "INFO", "WARNING", "ERROR"]}
# the flags that shape each step's outputs (the others change only speed, logging or where things go): a rerun
# with the same ones and the same files does nothing (flywheel.run stamps)
_ASK = ["classes", "seed", "teacher", "oracle_noise", "llm_base_url", "llm_model", "second_model", "second_pass",
        "conf_thresh", "target_label_precision", "confident_learning", "adaptive_thresh", "audit_frac", "second_temp",
        "max_invalid", "max_usd"]
_FIT = ["classes", "seed", "weights", "epochs", "batch_size", "lr", "weight_decay", "val_frac", "measure_noise_cost"]
_ROUTE = ["tau", "target_precision", "escalation_budget", "contest_below", "simulate_human"]
SHAPED_BY = {"prep": ["dataset", "classes", "max_per_class", "img_size", "no_sharpen"],
             "label": _ASK + ["max_label", "gold_csv", "gold_n", "min_gold_acc"],
             "train": _FIT, "eval": [], "cascade": _ASK + _ROUTE,
             "flywheel": _ASK + _ROUTE + _FIT + ["relabel_n", "relabel_strategy", "paid_answers", "pseudo_labels",
                                                 "turns", "flywheel_epochs", "retrain", "from_scratch"],
             "export": ["no_sharpen"], "report": []}
UNIT_INTERVAL = ["contest_below", "oracle_noise", "conf_thresh", "adaptive_thresh", "audit_frac", "min_gold_acc",
                 "target_precision", "target_label_precision"]
POSITIVE = ["img_size", "max_workers", "epochs", "batch_size", "lr", "timeout", "relabel_n", "turns"]
NON_NEGATIVE = ["max_per_class", "max_label", "max_retries", "max_invalid", "max_usd", "usd_per_call",
                "usd_per_mtok_in", "usd_per_mtok_out", "gold_n", "weight_decay", "second_temp", "num_threads"]


def build_parser():
    return cli.build_parser(OPTION_GROUPS, START_HERE, CHOICES, __doc__.split("\n\n")[0])


# --demo: a first run with nothing to download and no key (flags given on the command line still win)
DEMO = {"out_dir": "demo_run", "dataset": "folder", "teacher": "oracle", "oracle_noise": 0.15, "simulate_human": True,
        "weights": "none", "img_size": 32, "epochs": 12, "batch_size": 64, "max_label": 600, "gold_n": 40,
        "relabel_n": 150, "turns": 1, "retrain": "continue"}


def validate(cfg: dict) -> dict:
    """Fail before any work, naming the flag. Returns cfg with derived fields filled in."""
    def bad(flag, why):
        raise SystemExit(f"error: --{flag} {why}")
    for k in UNIT_INTERVAL:
        if not 0.0 <= cfg[k] <= 1.0:
            bad(k, f"must be in [0, 1], got {cfg[k]} (closest valid: {min(max(cfg[k], 0.0), 1.0):g})")
    for k in POSITIVE:
        if not cfg[k] > 0:
            bad(k, f"must be > 0, got {cfg[k]} (for example {OPTIONS[k][1]}, the default)")
    for k in NON_NEGATIVE:
        if cfg[k] < 0:
            bad(k, f"must be >= 0, got {cfg[k]} (closest valid: 0)")
    if not 0.0 < cfg["val_frac"] < 0.5:
        bad("val_frac", f"must be in (0, 0.5), got {cfg['val_frac']}")
    if cfg["tau"] is not None and not 0.0 < cfg["tau"] <= 1.0:
        bad("tau", f"must be in (0, 1], got {cfg['tau']}")
    if cfg["escalation_budget"] is not None and not 0.0 <= cfg["escalation_budget"] <= 1.0:
        bad("escalation_budget", f"must be in [0, 1], got {cfg['escalation_budget']}")
    if cfg["flywheel_epochs"] is not None and cfg["flywheel_epochs"] <= 0:
        bad("flywheel_epochs", f"must be > 0, got {cfg['flywheel_epochs']}")
    w = cfg["weights"]
    if w not in ("imagenet", "none") and not Path(w).is_file():
        bad("weights", f"must be imagenet, none or an existing checkpoint file; {w!r} is none of these")
    if cfg["gold_csv"] and not Path(cfg["gold_csv"]).is_file():
        bad("gold_csv", f"file {cfg['gold_csv']!r} does not exist")
    if cfg["second_model"] and cfg["teacher"] == "oracle":
        bad("second_model", "needs --teacher llm (the oracle has one simulated model)")
    if not 0 <= cfg["port"] <= 65535:
        bad("port", f"must be a TCP port in 0-65535, got {cfg['port']}")
    if not cfg["max_upload_mb"] > 0:
        bad("max_upload_mb", f"must be > 0, got {cfg['max_upload_mb']}")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # under torchrun
        if cfg["step"] != "train":
            bad("step", f"{cfg['step']} does not run under torchrun; only --step train does (DistributedDataParallel)")
        if cfg["measure_noise_cost"]:
            bad("measure_noise_cost", "is not supported under torchrun; measure it in a single-process run")
        if cfg["batch_size"] % int(os.environ["WORLD_SIZE"]):
            bad("batch_size", f"{cfg['batch_size']} must divide evenly over the {os.environ['WORLD_SIZE']} torchrun "
                              f"processes (it is the global batch; each process takes an equal slice)")
    if cfg["shard"] is not None:
        cfg["shard_i"], cfg["shard_n"] = parse_shard(cfg["shard"])
        if cfg["step"] != "label":
            bad("shard", f"applies to --step label only (got --step {cfg['step']}); merge the shards' ledgers with "
                         f"--step merge")
    if not cfg["llm_base_url"].startswith(("http://", "https://")):
        bad("llm_base_url", f"must start with http:// or https://, got {cfg['llm_base_url']!r}")
    flag_classes = cfg["classes"]
    cfg["classes"] = resolve_classes(cfg)
    made = Path(cfg["out_dir"]) / "classes.json"
    if cfg["step"] not in ("prep", "all") and made.exists():
        prepped = read_json(made)
        if flag_classes is None:
            cfg["classes"] = prepped  # later steps follow what prep made
        elif cfg["classes"] != prepped:
            bad("classes", f"is {cfg['classes']} but prep made {prepped} ({made}); rerun --step prep with these "
                           f"--classes first, or drop the flag")
    if (cfg["teacher"] == "llm" and not cfg["dry_run"] and cfg["step"] in ("label", "cascade", "flywheel", "all", "serve")
            and not os.environ.get(API_KEY_ENV, "").strip()):
        print(NO_KEY_MESSAGE, file=sys.stderr)
        raise SystemExit(EXIT_NO_KEY)
    return cfg


def parse_shard(text):
    """'I/N' -> (I, N) with 0 <= I < N.

    >>> parse_shard("1/4")
    (1, 4)
    >>> parse_shard("4/4")
    Traceback (most recent call last):
    ...
    SystemExit: error: --shard 4/4: I must be in 0..N-1 (parts are numbered from 0: 0/4, 1/4, 2/4, 3/4)
    """
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise SystemExit(f"error: --shard {text}: expected I/N, e.g. 0/2 and 1/2 for two machines") from None
    if n < 1 or not 0 <= i < n:
        raise SystemExit(f"error: --shard {text}: I must be in 0..N-1 (parts are numbered from 0: "
                         + ", ".join(f"{k}/{n}" for k in range(max(n, 1))) + ")")
    return i, n


def resolve_classes(cfg):
    """The class list, checked against the data source before any work."""
    from flywheel.data import DataError, cifar100_fine_names, cifar100_location, list_folder_dataset
    given = [c.strip() for c in cfg["classes"].split(",") if c.strip()] if cfg["classes"] else None
    if given is not None and len(set(given)) != len(given):
        raise SystemExit(f"error: --classes has duplicates: {cfg['classes']!r}")
    if given is not None and len(given) < 2:
        raise SystemExit(f"error: --classes needs at least 2 classes, got {given}")
    if cfg["dataset"] == "cifar100":
        classes = given or CIFAR5.split(",")
        # the 100 fine names: from the archive when it is there, else the built-in list
        folder, _ = cifar100_location(cfg["data_root"])
        names = cifar100_fine_names(folder) if (folder / "meta").exists() else CIFAR100_FINE
        unknown = [c for c in classes if c not in names]
        if unknown:
            raise SystemExit(f"error: --classes: {unknown[0]!r} is not a CIFAR-100 class"
                             + (cli.did_you_mean(unknown[0], names) if cli.closest(unknown[0], names) else
                                f"; the 100 fine names start {', '.join(names[:8])}, ..."))
        return classes
    run_classes = Path(cfg["out_dir"]) / "classes.json"
    if not Path(cfg["data_root"]).is_dir() and run_classes.exists():
        found = read_json(run_classes)  # data folder gone, but prep already ran: later steps still work
    else:
        try:
            found = sorted(list_folder_dataset(cfg["data_root"])["train"])
        except DataError as e:
            raise SystemExit(f"error: --data_root: {e}")
    classes = given or found
    unknown = [c for c in classes if c not in found]
    if unknown:
        raise SystemExit(f"error: --classes: {unknown[0]!r} has no folder under {cfg['data_root']}/train/"
                         + cli.did_you_mean(unknown[0], found))
    return classes


CIFAR100_FINE = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel "
    "can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur "
    "dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion "
    "lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree "
    "pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea "
    "seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table "
    "tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman "
    "worm").split()


def load_manifest(P):
    rows = read_csv(P.need(P.manifest, "prep"))
    return {r["path"]: r for r in rows}


# ----------------------------------------------------------------------------- prep

def step_prep(cfg, P):
    """CIFAR-100 (or an image folder) -> OUT/images/{train,test}/<class>/<class>_<NNNNN>.jpg + manifest.csv.

    Idempotent: an image made with the same settings is kept; a change of --img_size or sharpening
    regenerates every image (prep.json records the settings the images were made with).
    """
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from PIL import Image
    from tqdm import tqdm
    from flywheel.data import (ensure_cifar100, folder_image_name, jpeg_bytes, list_folder_dataset, load_cifar100_split,
                               upscale)
    classes, size, sharpen = cfg["classes"], cfg["img_size"], not cfg["no_sharpen"]
    settings = {"dataset": cfg["dataset"], "img_size": size, "sharpen": sharpen, "jpeg_quality": 90}
    old = read_json(P.prep_json) if P.prep_json.exists() else None
    regenerate = old is not None and old.get("settings") != settings
    if regenerate:
        log.info("prep settings changed (%s -> %s): regenerating every image", old.get("settings"), settings)
        import shutil
        shutil.rmtree(P.images, ignore_errors=True)

    jobs, skipped = [], []
    cap = cfg["max_per_class"] or None
    if cfg["dataset"] == "cifar100":
        folder = ensure_cifar100(cfg["data_root"])
        for split in ("train", "test"):
            imgs, labels, names = load_cifar100_split(folder, split)
            for c in classes:
                idx = np.flatnonzero(labels == names.index(c))[:cap]
                jobs += [PrepJob(split, c, f"{c}_{i:05d}.jpg", int(i), (lambda a=imgs[i]: Image.fromarray(a)),
                                 f"{split}[{i}]") for i in idx]
    else:
        tree = list_folder_dataset(cfg["data_root"])
        for split in ("train", "test"):
            for c in classes:
                files = tree[split].get(c, [])
                if split == "train" and len(files) < MIN_CLASS_IMAGES:
                    log.warning("class %r has only %d training image(s) in %s; the student and its validation "
                                "need more (at least %d)", c, len(files), Path(cfg["data_root"]) / split / c,
                                MIN_CLASS_IMAGES)
                # the output name comes from the file's own name, so adding a file renames nothing
                jobs += [PrepJob(split, c, folder_image_name(f.name), f.name, (lambda f=f: _open_image(f)), str(f))
                         for f in files[:cap]]

    def make(job):
        """-> (job, path under OUT, 'made' | 'kept' | error text, sha256). Runs in threads: Pillow releases
        the GIL while it decodes, resizes and encodes."""
        rel = Path("images") / job.split / job.cls / job.name
        dst = P.out / rel
        if dst.exists():
            return job, rel, "kept", sha256_file(dst)
        try:
            img = job.load()
        except Exception as e:  # unreadable files are skipped and listed, never fatal
            return job, rel, f"{type(e).__name__}: {e}", None
        atomic_write_bytes(dst, jpeg_bytes(upscale(img, size, sharpen), 90))
        return job, rel, "made", sha256_file(dst)

    rows = []
    made = kept = 0
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as ex, tqdm(total=len(jobs), desc="prep images", unit="img") as bar:
        for s in range(0, len(jobs), PREP_CHUNK):  # a chunk at a time: a million jobs are never all queued
            for job, rel, what, sha in ex.map(make, jobs[s:s + PREP_CHUNK]):
                bar.update(1)
                if sha is None:
                    skipped.append({"file": job.source, "error": what})
                    continue
                made, kept = made + (what == "made"), kept + (what == "kept")
                rows.append({"path": rel.as_posix(), "split": job.split, "label": job.cls,
                             "source_index": job.source_index, "sha256": sha})
    if not rows:
        raise SystemExit(f"error: prep found no images for classes {classes} under {cfg['data_root']}")
    rows, dups = drop_cross_split_duplicates(rows)
    if dups:
        log.warning("prep: %d training image(s) are byte-identical to a test image and are kept out of training "
                    "(listed in %s): %s", len(dups), P.prep_json,
                    ", ".join(d["train"] for d in dups[:5]) + (" ..." if len(dups) > 5 else ""))
    write_csv(P.manifest, ["path", "split", "label", "source_index", "sha256"], rows)
    write_json(P.classes, classes)
    counts = {s: {c: sum(r["split"] == s and r["label"] == c for r in rows) for c in classes} for s in ("train", "test")}
    write_json(P.prep_json, {"settings": settings, "classes": classes, "counts": counts, "made": made,
                             "kept": kept, "skipped": skipped, "cross_split_duplicates": dups,
                             "source": str(cfg["data_root"])})
    if skipped:
        log.warning("prep skipped %d unreadable file(s): %s", len(skipped),
                    ", ".join(s["file"] for s in skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
    log.info("prep: %d images (%d made, %d already there) -> %s; manifest -> %s; per split/class %s",
             len(rows), made, kept, P.images, P.manifest, json.dumps(counts))
    return counts


MIN_CLASS_IMAGES = 10
PREP_CHUNK = 4096  # images queued to the prep threads at once


class PrepJob(NamedTuple):
    split: str
    cls: str
    name: str            # output file name under images/<split>/<class>/
    source_index: object  # CIFAR: index in the official split array; folder: the source file name
    load: Callable        # () -> PIL image
    source: str           # for error messages


def drop_cross_split_duplicates(rows):
    """-> (rows without training images whose bytes also appear in the test split, [{train, test}]).
    A test image seen in training would inflate every test figure.

    >>> rows = [{"path": "a", "split": "train", "sha256": "1"}, {"path": "b", "split": "test", "sha256": "1"},
    ...         {"path": "c", "split": "train", "sha256": "2"}]
    >>> kept, dups = drop_cross_split_duplicates(rows)
    >>> [r["path"] for r in kept], dups
    (['b', 'c'], [{'train': 'a', 'test': 'b'}])
    """
    test = {}
    for r in rows:
        if r["split"] == "test":
            test.setdefault(r["sha256"], r["path"])
    dups = [{"train": r["path"], "test": test[r["sha256"]]} for r in rows
            if r["split"] == "train" and r["sha256"] in test]
    drop = {d["train"] for d in dups}
    return [r for r in rows if r["path"] not in drop], dups


def _open_image(f):
    from PIL import Image
    with Image.open(f) as im:
        im.load()
        return im.convert("RGB")


# ----------------------------------------------------------------------------- teacher + label
API_KEY_ENV = "OPENROUTER_API_KEY"
EXIT_NO_KEY, EXIT_TEACHER_FATAL, EXIT_GOLD_GATE, EXIT_BUDGET = 2, 3, 4, 5
NO_KEY_MESSAGE = (
    f"error: {API_KEY_ENV} is not set. Put it in the environment (export {API_KEY_ENV}=...) or in a .env file "
    f"in the folder you run from (a line {API_KEY_ENV}=...). To run with no key: --teacher oracle "
    f"--oracle_noise 0.1 (a SIMULATED teacher), or --dry_run to price the job, or point --llm_base_url at a "
    f"local OpenAI-compatible server (vLLM, Ollama, LM Studio) and set the variable to any non-empty value.")


def teacher_model_name(cfg):
    from flywheel.teacher import oracle_model_name
    return oracle_model_name(cfg["oracle_noise"]) if cfg["teacher"] == "oracle" else cfg["llm_model"]


def make_teacher(cfg, manifest):
    """The LLM client, or the SIMULATED oracle. A missing key exits 2 before any work."""
    from flywheel.teacher import LLMTeacher, OracleTeacher
    if cfg["teacher"] == "oracle":
        truth = {p: r["label"] for p, r in manifest.items()}
        return OracleTeacher(truth, cfg["classes"], cfg["oracle_noise"], cfg["usd_per_call"], cfg["seed"])
    key = os.environ.get(API_KEY_ENV, "").strip()
    if not key:
        print(NO_KEY_MESSAGE, file=sys.stderr)
        raise SystemExit(EXIT_NO_KEY)
    return LLMTeacher(cfg["llm_base_url"], cfg["llm_model"], key, cfg["classes"], timeout=cfg["timeout"],
                      max_retries=cfg["max_retries"], usd_per_mtok_in=cfg["usd_per_mtok_in"],
                      usd_per_mtok_out=cfg["usd_per_mtok_out"])


def make_qc(cfg, P=None):
    """The QC policy; with P, the threshold the label step fitted on gold (label_summary.json) too, so
    cascade and flywheel judge answers the way the label step did."""
    from flywheel.labeling import QC
    qc = QC(cfg["classes"], cfg["conf_thresh"], cfg["second_pass"], cfg["adaptive_thresh"], cfg["audit_frac"],
            cfg["second_temp"], cfg["max_invalid"], cfg["seed"], cfg["second_model"])
    if P is not None and P.label_summary.exists():
        t = (read_json(P.label_summary).get("qc_rule") or {}).get("threshold")
        qc.threshold = float("inf") if t is None else float(t)
    if P is not None and P.label_flags.exists() and cfg["second_pass"] == "fitted":
        qc.flagged = {r["sha256"] for r in read_csv(P.label_flags)}
    return qc


def make_budget(cfg, ledger):
    """Every call is reserved at the higher of --usd_per_call and the dearest call this model has cost."""
    from flywheel.labeling import Budget
    return Budget(cfg["max_usd"], ledger.total_cost(), cfg["usd_per_call"],
                  known_price=ledger.max_cost_per_call(teacher_model_name(cfg)))


def item(P, manifest, path):
    return {"path": path, "file": str(P.out / path), "sha256": manifest[path]["sha256"]}


def label_sample(cfg, manifest):
    """-> (sample paths with gold first, {gold path: gold label}). Ground truth picks nothing here
    except the --gold_n stand-in labels, which play a person checking those items."""
    train = sorted(p for p, r in manifest.items() if r["split"] == "train")
    order = train[:]
    random.Random(cfg["seed"]).shuffle(order)  # a fixed order, so a larger --max_label extends the sample
    gold = {}
    if cfg["gold_csv"]:
        for i, r in enumerate(read_csv(cfg["gold_csv"])):
            p, lab = (r.get("path") or "").strip(), (r.get("label") or "").strip()
            if p not in manifest or manifest[p]["split"] != "train":
                raise SystemExit(f"error: --gold_csv row {i + 2}: path {p!r} is not a training image in "
                                 f"{cfg['out_dir']}/manifest.csv (use paths like images/train/<class>/<file>.jpg)")
            if lab not in cfg["classes"]:
                raise SystemExit(f"error: --gold_csv row {i + 2}: label {lab!r} is not one of {cfg['classes']}")
            gold[p] = lab
    elif cfg["gold_n"]:
        gold = {p: manifest[p]["label"] for p in order[:cfg["gold_n"]]}
    if len(gold) > cfg["max_label"]:
        raise SystemExit(f"error: {len(gold)} gold items exceed --max_label {cfg['max_label']}; gold items count "
                         f"within the sample")
    rest = [p for p in order if p not in gold][:max(0, cfg["max_label"] - len(gold))]
    return list(gold) + rest, gold


def shard_of(sample, gold, manifest, i, n):
    """The part of the sample (and of its gold) that shard i of n labels: a stable hash of each image's
    sha256 picks its part, so parts are disjoint, cover the sample, and do not depend on the machine.

    >>> m = {f"p{k}": {"sha256": f"{k:064x}"} for k in range(100)}
    >>> parts = [shard_of(list(m), {"p1": "x"}, m, i, 3) for i in range(3)]
    >>> sorted(sum((p for p, _ in parts), [])) == sorted(m), sum(len(g) for _, g in parts)
    (True, 1)
    """
    from flywheel.io import stable_unit
    mine = [p for p in sample if int(stable_unit("shard", manifest[p]["sha256"]) * n) == i]
    keep = set(mine)
    return mine, {p: lab for p, lab in gold.items() if p in keep}


def plan_calls(items, model, ledger, qc):
    """(fewest, most) calls still needed for items, from what the ledger already holds."""
    lo = hi = 0
    for it in items:
        p1 = ledger.ok(qc.call(it["sha256"], 1, model).key)
        p2 = ledger.ok(qc.call(it["sha256"], 2, model).key)
        if p1 is None:
            # a second call is certain under always, for gold items, and under fitted with no gold to fit
            sure = (qc.second_pass == "always" or it["sha256"] in qc.always_second
                    or (qc.second_pass == "fitted" and not qc.always_second))
            lo, hi = lo + 1 + sure, hi + 2
        elif p2 is None and qc.second_needed(it["sha256"], float(p1["confidence"])):
            lo, hi = lo + 1, hi + 1
    return lo, hi


def step_label(cfg, P):
    """Sampled training images -> teacher (dual pass, QC) -> labels.jsonl -> review CSVs + summary."""
    from flywheel.labeling import label_items
    from flywheel.ledger import Ledger
    from flywheel.quality import fit_rule
    from flywheel.teacher import FatalTeacherError
    manifest = load_manifest(P)
    sample, gold = label_sample(cfg, manifest)
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
    ledger = Ledger(ledger_path)
    qc = make_qc(cfg)
    qc.always_second = {it["sha256"] for it in items if it["path"] in gold}
    if cfg["dry_run"]:
        lo, hi = plan_calls(items, teacher_model_name(cfg), ledger, qc)
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
        return None
    check_review_file(P)
    teacher = make_teacher(cfg, manifest)
    budget = make_budget(cfg, ledger)
    gold_report = None
    person_gold = gold if cfg["gold_csv"] else {}  # hand-checked labels train as source gold; --gold_n only measures
    rule = fit_rule([], cfg["target_label_precision"])
    if cfg["shard"]:  # a part's review files would describe a part: the merged ledger's plain label run writes them
        def outputs(**_):
            log.info("label: shard %s stopped or done: %d calls, $%.4f in %s. Copy it into the main run folder, "
                     "run --step merge, then --step label without --shard.", cfg["shard"], budget.calls,
                     budget.run_spent, ledger_path)
    else:  # gold_report and rule are read when it runs: the gold check and the fitted rule below set them
        outputs = lambda **kw: write_label_outputs(cfg, P, items, ledger, teacher, manifest, gold_report, qc,  # noqa: E731
                                                   person_gold, rule=rule, **kw)
    write_flags(P, None, None)  # refilled below when the held-out model's flags are fitted; no stale ones
    try:
        rest = [it for it in items if it["path"] not in gold]
        if gold:
            gitems = [it for it in items if it["path"] in gold]
            verdicts = label_items(gitems, teacher, ledger, qc, budget, "gold", cfg["max_workers"], "label gold")
            gold_report = gold_check(gold, {p: v[1] for p, v in verdicts.items()}, cfg["classes"])
            rule = fit_rule(gold_pins(gitems, gold, teacher, ledger, qc), cfg["target_label_precision"])
            log.info("gold check: teacher accuracy %.3f on %d gold items (--min_gold_acc %.2f)",
                     gold_report["accuracy"], gold_report["n"], cfg["min_gold_acc"])
            if gold_report["accuracy"] < cfg["min_gold_acc"]:
                outputs()
                print(f"error: teacher accuracy on gold items is {gold_report['accuracy']:.3f} < --min_gold_acc "
                      f"{cfg['min_gold_acc']}; stopping before labeling the rest. Confusions (true -> teacher: n): "
                      + ", ".join(f"{k}: {v}" for k, v in gold_report["confusions"].items())
                      + ". Check the prompt, the model and the class names.", file=sys.stderr)
                raise SystemExit(EXIT_GOLD_GATE)
            if qc.second_pass == "fitted":
                rule = fit_qc_rule(cfg, P, items, rest, gitems, gold, teacher, ledger, qc, budget)
        label_items(rest, teacher, ledger, qc, budget, "label", cfg["max_workers"], "label")
        summary = outputs(budget_stopped=budget.stopped)  # before the ledger closes: the outputs read it
        if budget.stopped:
            print(f"error: budget stop: --max_usd {cfg['max_usd']} is spent (${ledger.total_cost():.4f} recorded in "
                  f"{ledger_path.name}); the answers paid for are kept. Raise --max_usd and rerun to label the rest.",
                  file=sys.stderr)
            raise SystemExit(EXIT_BUDGET)
        return summary
    except FatalTeacherError as e:
        outputs(budget_stopped=budget.stopped)
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_TEACHER_FATAL)
    except KeyboardInterrupt:
        outputs(budget_stopped=budget.stopped, interrupted=True)  # the files match what was paid
        raise
    finally:
        teacher.close()
        ledger.close()


def fit_qc_rule(cfg, P, items, rest, gitems, gold, teacher, ledger, qc, budget):
    """The fitted rule: with --confident_learning on, every first answer is asked first, so the held-out
    model can judge each label before any second call; then threshold and flag cut are fitted on gold
    and set on qc (flagged labels listed in label_flags.csv). -> QCRule."""
    from flywheel.labeling import label_items
    from flywheel.quality import fit_rule
    scores = None
    if cfg["confident_learning"] == "on":
        label_items(rest, teacher, ledger, qc, budget, "label", cfg["max_workers"], "label (first answers)",
                    first_only=True)
        scores = held_out_scores(cfg, items, teacher, ledger, qc)
    rule = fit_rule(gold_pins(gitems, gold, teacher, ledger, qc, scores), cfg["target_label_precision"],
                    flag_cuts(scores))
    qc.threshold = rule.threshold
    # gold pins are judged by both answers (and a person's label), so they are never listed as flagged
    qc.flagged = write_flags(P, {sha: h for sha, h in (scores or {}).items() if sha not in qc.always_second},
                             rule.flag_below)
    log.info("QC rule: %s", rule.why)
    return rule


def gold_pins(gitems, gold, teacher, ledger, qc, scores=None):
    """[{conf1, score, right1, agree, right_pair[, cl_conf]}] for gold items with a first answer: what
    fit_rule needs. scores: held_out_scores' output (None: no held-out model)."""
    from flywheel.quality import score
    out = []
    for it in gitems:
        p1 = ledger.ok(qc.call(it["sha256"], 1, teacher.model).key)
        p2 = ledger.ok(qc.call(it["sha256"], 2, teacher.model).key)
        if p1 is None:
            continue
        truth = gold[it["path"]]
        agree = None if p2 is None else p2["label"] == p1["label"]
        g = {"conf1": float(p1["confidence"]), "score": score(p1["confidence"], it["sha256"], qc.seed),
             "right1": p1["label"] == truth, "agree": agree, "right_pair": bool(agree) and p1["label"] == truth}
        if scores and it["sha256"] in scores:
            g["cl_conf"] = scores[it["sha256"]].p_label
        out.append(g)
    return out


class HeldOut(NamedTuple):
    """The held-out model's view of one first answer."""
    path: str
    llm_label: str
    p_label: float        # held-out probability of the teacher's first-answer label (the score)
    student_label: str    # the held-out model's top class
    p_student: float      # and its probability


def held_out_scores(cfg, items, teacher, ledger, qc):
    """The student's out-of-sample disagreement (flywheel.quality): a logistic regression on 12x12 pixels,
    trained in folds on the teacher's first answers, judges each label without having seen it. Gold
    items' labels here are first answers too, so judging the score on gold stays honest.
    -> {sha256: HeldOut}, or None when there are too few first answers to train on."""
    import numpy as np
    from flywheel.quality import CL_FOLDS, CL_MIN_ITEMS, out_of_fold_probs, pixel_features
    got = [(it, rec) for it in items if (rec := ledger.ok(qc.call(it["sha256"], 1, teacher.model).key)) is not None]
    y = np.array([cfg["classes"].index(rec["label"]) for _, rec in got])
    if len(got) < CL_MIN_ITEMS or len(set(y.tolist())) < 2:
        log.info("held-out model skipped: %d first answers (needs >= %d in 2+ classes)", len(got), CL_MIN_ITEMS)
        return None
    t0 = time.time()
    probs = out_of_fold_probs(pixel_features([it["file"] for it, _ in got]), y, len(cfg["classes"]), seed=cfg["seed"])
    log.info("held-out model: %d folds on %d first answers in %.1fs", CL_FOLDS, len(got), time.time() - t0)
    return {it["sha256"]: HeldOut(it["path"], rec["label"], round(float(pr[k]), 6), cfg["classes"][int(pr.argmax())],
                                  round(float(pr.max()), 6))
            for (it, rec), pr, k in zip(got, probs, y)}


def flag_cuts(scores):
    """Candidate cuts on the held-out score: its FLAG_SHARES quantiles over every image judged."""
    import numpy as np
    from flywheel.quality import FLAG_SHARES
    if not scores:
        return []
    return [float(q) for q in np.quantile([h.p_label for h in scores.values()], FLAG_SHARES)]


def write_flags(P, scores, cut):
    """label_flags.csv: the labels sent to review because the held-out model gives them < cut."""
    rows = [{"sha256": sha, **h._asdict()} for sha, h in (scores or {}).items() if cut is not None and h.p_label < cut]
    write_csv(P.label_flags, ["path", "sha256", "llm_label", "p_label", "student_label", "p_student"], rows)
    return {r["sha256"] for r in rows}


def check_review_file(P):
    """A review_labels.csv a spreadsheet saved must still have the columns the pipeline reads."""
    from flywheel.io import read_csv_header
    from flywheel.ledger import check_review_columns
    if P.review.exists():
        try:
            check_review_columns(read_csv_header(P.review), str(P.review))
        except ValueError as e:
            raise SystemExit(f"error: {e}")


def gold_check(gold, answers, classes):
    """Teacher ({path: label, "" when unanswered}) vs gold labels; an unanswered item counts as wrong."""
    from collections import Counter
    n = len(gold)
    got = {p: answers.get(p) or "" for p in gold}
    right = sum(got[p] == lab for p, lab in gold.items())
    conf = Counter(f"{lab} -> {got[p] or 'no answer'}" for p, lab in gold.items() if got[p] != lab)
    per_class = {c: {d: sum(1 for p, lab in gold.items() if lab == c and got[p] == d) for d in classes + [""]}
                 for c in classes}
    return {"n": n, "accuracy": right / n if n else 0.0, "confusions": dict(conf.most_common()),
            "per_class_confusion": per_class}


def write_label_outputs(cfg, P, items, ledger, teacher, manifest, gold_report, qc, person_gold=None,
                        budget_stopped=False, interrupted=False, rule=None):
    """labels_llm.csv, review_labels.csv (keeping what a person decided) and label_summary.json, all
    from the ledger, so a crashed, stopped or interrupted run still leaves files that match what was paid.
    person_gold: {path: label} from --gold_csv, written as status gold rows (they train as source gold)."""
    from flywheel.labeling import current_keys, ledger_verdict
    from flywheel.ledger import GOLD, REVIEW_FIELDS, STATUSES, is_person_row, merge_review
    from flywheel.teacher import PROMPT_VERSION
    person_gold = person_gold or {}
    vs = {it["path"]: ledger_verdict(it, teacher, ledger, qc) for it in items}
    rows = [{"path": p, "llm_label": lab, "confidence": "" if c is None else f"{c:.4f}",
             "label_final": person_gold.get(p, lab), "status": GOLD if p in person_gold else st}
            for p, (st, lab, c, _) in vs.items()]
    old = read_csv(P.review) if P.review.exists() else []
    rows = merge_review(rows, old)
    in_sample = set(vs)
    kept = [o for o in old if o["path"] not in in_sample and is_person_row(o)]
    if kept:
        log.info("keeping %d review row(s) a person decided outside the current sample", len(kept))
    write_csv(P.review, REVIEW_FIELDS, rows + kept)
    write_csv(P.labels_llm, ["path", "llm_label", "confidence"], [r for r in rows if r["llm_label"]])

    counts = {s: sum(v[0] == s for v in vs.values()) for s in STATUSES}
    keys = current_keys(items, teacher, qc)  # this model, prompt and sample only: not every ledger line
    recs = ledger.calls(keys)
    paid = [r for r in recs if r.get("status") in ("ok", "invalid")]
    two = [v for v in vs.values() if len(v[3]) == 2]
    acc = [v for p, v in vs.items() if v[0] == "accepted"]
    truth = {p: manifest[p]["label"] for p in vs}
    p1 = [(p, v[3][0]["label"]) for p, v in vs.items() if v[3]]
    summary = {
        "source": teacher.source, "simulated": teacher.source == "oracle",
        "model": teacher.model, "host": teacher.host, "prompt_version": PROMPT_VERSION,
        "second_pass": qc.second_pass, "conf_thresh": qc.conf_thresh, "second_model": qc.second_model,
        "qc_rule": rule.to_json() if rule is not None and qc.second_pass == "fitted" else None,
        # the estimate judges gold under the fitted rule, so it describes the labels only when that rule is in force
        "estimated_accuracy": rule.estimate if rule is not None and rule.n_gold and qc.second_pass == "fitted" else None,
        "yield": round(counts["accepted"] / len(vs), 4) if vs else None,
        "requested_images": len(vs), **counts,
        "calls": len(paid), "calls_pass1": sum(r.get("pass") == 1 for r in paid),
        "calls_pass2": sum(r.get("pass") == 2 for r in paid),
        "calls_error": sum(r.get("status") == "error" for r in recs),
        "calls_invalid": sum(r.get("status") == "invalid" for r in recs),
        "calls_per_image": len(paid) / len(vs) if vs else 0.0,
        "calls_per_accepted": len(paid) / len(acc) if acc else None,
        "agreement_rate": (sum(v[3][0]["label"] == v[3][1]["label"] for v in two) / len(two)) if two else None,
        "prompt_tokens": sum(int(r.get("prompt_tokens") or 0) for r in recs),
        "completion_tokens": sum(int(r.get("completion_tokens") or 0) for r in recs),
        "cost_usd": round(sum(float(r.get("cost_usd") or 0) for r in recs), 6),
        "cost_estimated": any(r.get("cost_estimated") for r in paid),
        "mean_cost_per_call_usd": (sum(float(r.get("cost_usd") or 0) for r in paid) / len(paid)) if paid else None,
        "mean_latency_s": (sum(float(r.get("latency_s") or 0) for r in paid) / len(paid)) if paid else None,
        "teacher_accuracy": (sum(v[1] == truth[p] for p, v in vs.items() if v[0] == "accepted") / len(acc)) if acc else None,
        "pass1_accuracy": (sum(lab == truth[p] for p, lab in p1) / len(p1)) if p1 else None,
        "gold_accuracy": gold_report["accuracy"] if gold_report else None,
        "gold": gold_report,
        "budget_stopped": bool(budget_stopped), "interrupted": bool(interrupted), "max_usd": cfg["max_usd"],
        "ledger_bad_lines": ledger.bad_lines,
        "note": ("teacher_accuracy and pass1_accuracy use the manifest's ground truth for measurement only; "
                 "it never chose a label.") + (" SIMULATED teacher (oracle): labels are ground truth with "
                                               "injected noise, costs are --usd_per_call estimates." if teacher.source == "oracle" else "")
                 + (" Some costs are token-price estimates: the server reported no usage.cost." if any(r.get("cost_estimated") for r in paid) and teacher.source != "oracle" else ""),
    }
    write_json(P.label_summary, summary)
    if summary["estimated_accuracy"]:
        e = summary["estimated_accuracy"]
        log.info("label quality: accepted labels estimated %s accurate (95%% CI %s-%s, from %d gold pins); "
                 "measured against the manifest: %s (raw first answers %s)", _fmt(e["accuracy"]), *e["ci95"],
                 rule.n_gold, _fmt(summary["teacher_accuracy"]), _fmt(summary["pass1_accuracy"]))
    log.info("label: %d images: %s; %d paid calls, $%.4f%s; agreement %s; teacher accuracy %s -> %s, %s, %s",
             len(vs), counts, len(paid), summary["cost_usd"], " (estimated)" if summary["cost_estimated"] else "",
             _fmt(summary["agreement_rate"]), _fmt(summary["teacher_accuracy"]), P.review, P.labels_llm, P.label_summary)
    return summary


def _fmt(x, nd=3):
    return "n/a" if x is None else f"{x:.{nd}f}"


# ----------------------------------------------------------------------------- merge (sharded labeling)

def step_merge(cfg, P):
    """OUT/labels.shard-*.jsonl (copied here from the machines that labeled them) -> appended to labels.jsonl.

    Every call a shard paid for is kept, except an answer to a key labels.jsonl already answers, so no key
    has two answers. labels_merge.json remembers how far each shard file was merged: a rerun, or a shard
    that grew since, adds only what is new. Then `--step label` (no --shard) writes the review files from
    the merged ledger, asking only what the whole sample's QC rule still needs."""
    from flywheel.ledger import Ledger, merge_ledger_file
    shards = P.shard_ledgers()
    if not shards:
        raise SystemExit(f"error: no labels.shard-I-of-N.jsonl in {P.out}; label with --step label --shard I/N on "
                         f"each machine, copy those files here, then rerun --step merge")
    done = read_json(P.label_merge) if P.label_merge.exists() else {}
    ledger = Ledger(P.ledger)
    try:
        for path in shards:
            r = merge_ledger_file(ledger, path, done.get(path.name))
            done[path.name] = r.state
            write_json(P.label_merge, done)  # after each shard: an interrupted merge resumes where it stopped
            log.info("merge: %s: %d call(s) added, %d answer(s) already in %s skipped, %d bad line(s)", path.name,
                     r.added, r.duplicates, P.ledger.name, r.bad_lines)
        log.info("merge: %s now holds %d calls ($%.4f); next: uv run cifar_distill.py --step label --out_dir %s",
                 P.ledger, len(ledger), ledger.total_cost(), P.out)
    finally:
        ledger.close()
    return done


# ----------------------------------------------------------------------------- student: train
TRAIN_ROW_FIELDS = ["path", "label", "source", "split", "turn"]


def training_rows(cfg, P, manifest, upto_turn=0):
    """-> (train rows, val rows), each {path, label, source, split, turn}.

    The label step's accepted rows and a person's rows are split into train/val by a hash of (--seed,
    image sha256), so the val split stays the same across flywheel turns and label edits. Flywheel labels
    (source escalation / cascade / human / simulated_human) from turns <= upto_turn go to train only;
    pseudo labels (the student's own) only from turn upto_turn itself, since each turn's student redraws them.
    """
    from flywheel.ledger import training_labels
    from flywheel.student import hash_split
    review = read_csv(P.need(P.review, "label"))
    summary = read_json(P.label_summary) if P.label_summary.exists() else {}
    try:
        base = training_labels(review, cfg["classes"], summary.get("source", "llm"))
    except ValueError as e:
        raise SystemExit(f"error: {P.review}: {e}")
    gone = [p for p, _, _ in base if p not in manifest]
    if gone:  # prep was rerun without these images: a person's row stays in the CSV, but cannot train
        log.warning("%d review row(s) name images no longer in %s (e.g. %s); they are left out of training",
                    len(gone), P.manifest, gone[0])
        base = [b for b in base if b[0] in manifest]
    if len(base) < 2 * len(cfg["classes"]):
        raise SystemExit(f"error: only {len(base)} usable labels in {P.review} (accepted rows and human edits); "
                         f"label more images (--max_label) or review the rejected rows")
    labels = [cfg["classes"].index(lab) for _, lab, _ in base]
    # validation by a hash of (seed, image sha256): an edited label or a new image moves nothing else
    tr, va = hash_split([manifest[p]["sha256"] for p, _, _ in base], labels, cfg["val_frac"], cfg["seed"])
    train = [{"path": base[i][0], "label": base[i][1], "source": base[i][2], "split": "train", "turn": 0} for i in tr]
    val = [{"path": base[i][0], "label": base[i][1], "source": base[i][2], "split": "val", "turn": 0} for i in va]
    if P.flywheel_labels.exists() and upto_turn > 0:
        seen = {r["path"] for r in train + val}
        for r in read_csv(P.flywheel_labels):
            if int(r["turn"]) <= upto_turn and r["path"] not in seen and (r["source"] != "pseudo" or int(r["turn"]) == upto_turn):
                train.append({**r, "split": "train"})
                seen.add(r["path"])
    leaked = [r["path"] for r in train + val if split_of(manifest, r["path"]) not in ("train", "production")]
    assert not leaked, f"test images in the training data: {leaked[:5]}"
    return train, val


def image_cache(P):
    """The run's memory-mapped image cache (flywheel.imcache), built or finished on first use."""
    from flywheel.imcache import ImageCache
    return ImageCache(P.out, read_csv(P.need(P.manifest, "prep")))


def images_of(P, rows, desc="decode"):
    """A lazy uint8 [N, 3, H, W] view of rows' images: manifest images come from the cache in chunks as
    they are used; production uploads (not in the manifest) are decoded into memory."""
    from flywheel.student import decode_images
    return image_cache(P).view([r["path"] for r in rows],
                               extra=lambda paths: decode_images([P.out / p for p in paths], desc=desc))


def load_split(P, rows, classes, desc):
    import numpy as np
    y = np.array([classes.index(r["label"]) for r in rows], dtype=np.int64)
    return images_of(P, rows, desc), y


def step_train(cfg, P, art=None, turn=0, init=None, resume=None):
    """review_labels.csv (+ flywheel labels) -> art/{last,best}.pt, mobilenet.pt, train_rows.csv."""
    from flywheel.student import WeightsError, calibrate_checkpoint, dist_world, pick_device, save_torch, train_student
    art = Path(art or P.artifacts)
    art.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(P)
    classes = cfg["classes"]
    train, val = training_rows(cfg, P, manifest, upto_turn=turn)
    device = pick_device(cfg["device"])
    x_tr, y_tr = load_split(P, train, classes, "decode train")
    x_va, y_va = load_split(P, val, classes, "decode val")
    epochs = (cfg["flywheel_epochs"] or cfg["epochs"]) if turn else cfg["epochs"]
    tcfg = {k: cfg[k] for k in ("epochs", "batch_size", "lr", "weight_decay", "seed", "val_frac", "weights",
                                "img_size", "device")}
    tcfg.update(epochs=epochs, turn=turn, out_dir=str(P.out), img_size=int(x_tr.shape[-1]),  # as prepped, not the flag
                rows={r["path"]: [r["label"], r["split"]] for r in train + val})  # --resume refuses if these change
    log.info("train: %d train / %d val images, %s, device %s, init %s", len(train), len(val),
             json.dumps(_count(train + val, "source")), device, init or cfg["weights"])
    try:
        best = train_student(x_tr, y_tr, x_va, y_va, classes, tcfg, art, init or cfg["weights"], device,
                             resume=cfg["resume"] if resume is None else resume)
    except WeightsError as e:
        raise SystemExit(f"error: {e}")
    if dist_world()[0] != 0:
        return best  # under torchrun, rank 0 calibrates and writes; the others are done
    best["val_paths"] = [r["path"] for r in val]
    best = calibrate_checkpoint(best, x_va, y_va, device, art / "best.pt")
    write_csv(art / "train_rows.csv", TRAIN_ROW_FIELDS, train + val)  # the rows best.pt was trained on
    if turn == 0:
        p = record_promotion(P)  # over every existing turn, on validation: a later turn keeps shipping if it is better
        if len(p.candidates) > 1:
            log.warning("train: turn 0 was retrained; turns %s were grown from the earlier turn-0 student and stay "
                        "candidates (validation chose turn %d). Delete %s/turn_* to start the flywheel over.",
                        [c["turn"] for c in p.candidates if c["turn"]], p.turn, P.artifacts)
    save_torch(best["model"], art / "mobilenet.pt")
    train_clean_twin(cfg, P, art, manifest, train, val, x_tr, x_va, tcfg, init, device)
    log.info("train: best epoch %s val acc %.4f; temperature %.3f, val ECE %.4f -> %.4f; wrote %s, %s, %s",
             best.get("best_epoch"), best["best_val_acc"], best["temperature"], best["val_ece_before"],
             best["val_ece_after"], art / "last.pt", art / "best.pt", art / "mobilenet.pt")
    return best


NOISE_TWIN = "noise_cost"  # art/noise_cost/: the same training on ground-truth labels, for measuring only


def train_clean_twin(cfg, P, art, manifest, train, val, x_tr, x_va, tcfg, init, device):
    """With --measure_noise_cost: the same images, epochs, init and seed, trained on the manifest's
    ground-truth labels into art/noise_cost/. Eval reports its test accuracy beside the student's; the
    twin is never promoted, exported or used to choose anything."""
    import shutil
    import numpy as np
    from flywheel.student import train_student
    twin = Path(art) / NOISE_TWIN
    shutil.rmtree(twin, ignore_errors=True)  # a stale twin would describe other training rows
    if not cfg["measure_noise_cost"]:
        return None
    classes = cfg["classes"]
    # production uploads (--step serve) have no ground truth: the twin trains without them
    keep_tr = [i for i, r in enumerate(train) if r["path"] in manifest]
    train, x_tr = [train[i] for i in keep_tr], x_tr.take(keep_tr)
    y_tr = np.array([classes.index(manifest[r["path"]]["label"]) for r in train], dtype=np.int64)
    y_va = np.array([classes.index(manifest[r["path"]]["label"]) for r in val], dtype=np.int64)
    wrong = sum(manifest[r["path"]]["label"] != r["label"] for r in train + val)
    log.info("train: measuring the cost of label noise: the same %d images on ground-truth labels (%d of the "
             "training labels differ from it) -> %s", len(train) + len(val), wrong, twin)
    return train_student(x_tr, y_tr, x_va, y_va, classes, {**tcfg, "measure_only": True}, twin,
                         init or cfg["weights"], device)


def noise_cost(art, x_test, y_test, student_acc, device):
    """eval.json's noise_cost section, when train made the ground-truth twin; else None."""
    from flywheel.student import load_checkpoint, model_from_checkpoint, predict_logits
    path = Path(art) / NOISE_TWIN / "best_epoch.pt"
    if not path.exists():
        return None
    twin = load_checkpoint(path)
    logits = predict_logits(model_from_checkpoint(twin, device), x_test, device, twin["config"]["batch_size"])
    clean = float((logits.argmax(1) == y_test).mean())
    return {"student_accuracy": student_acc, "ground_truth_twin_accuracy": clean,
            "noise_cost_pts": round(100 * (clean - student_acc), 2),
            "note": "the same images, epochs, init and seed trained on the manifest's ground-truth labels; "
                    "measured only, it chooses nothing"}


def _count(rows, key):
    from collections import Counter
    return dict(Counter(r[key] for r in rows))


# ----------------------------------------------------------------------------- eval + calibration
COVERAGE_TARGETS = (0.90, 0.95, 0.99)


def heldout_rows(manifest):
    return [{"path": p, "label": r["label"]} for p, r in sorted(manifest.items()) if r["split"] == "test"]


def student_probs(P, rows, best, device, desc, keep_images=False):
    """Calibrated probabilities [N, C] and uncalibrated logits for manifest rows, with the mean
    student time per image in ms (batched, on `device`, reading the image cache one batch at a time);
    keep_images adds the lazy uint8 image view."""
    from flywheel.calibrate import softmax
    from flywheel.student import model_from_checkpoint, predict_logits
    x = images_of(P, rows, desc)
    model = model_from_checkpoint(best, device)
    t0 = time.perf_counter()
    logits = predict_logits(model, x, device, best["config"]["batch_size"], desc=desc)
    ms = (time.perf_counter() - t0) * 1000 / max(len(rows), 1)
    out = softmax(logits, best["temperature"]), logits, ms
    return out + (x,) if keep_images else out


def step_eval(cfg, P, art=None):
    """best.pt + the official test split -> eval.json, test_predictions.csv (calibrated confidences)."""
    import numpy as np
    from flywheel.calibrate import (classification_metrics, coverage_precision, ece, reliability_bins, softmax,
                                    threshold_for_precision)
    from flywheel.student import load_student, pick_device
    art = Path(art or P.artifacts)
    best = load_student(art / "best.pt")
    classes = best["classes"]
    manifest = load_manifest(P)
    rows = heldout_rows(manifest)
    device = pick_device(cfg["device"])
    probs, logits, ms, x_test = student_probs(P, rows, best, device, "eval test", keep_images=True)
    y = np.array([classes.index(r["label"]) for r in rows])
    pred = probs.argmax(1)
    m = classification_metrics(y, pred, classes)
    p0 = softmax(logits)
    conf0, conf1 = p0.max(1), probs.max(1)
    # thresholds come from validation only; test just measures them
    vp = softmax(best["val_logits"], best["temperature"])
    vconf, vcorrect = vp.max(1), vp.argmax(1) == best["val_labels"]
    cov = {}
    for t in COVERAGE_TARGETS:
        tau = threshold_for_precision(vconf, vcorrect, t)
        c, prec = coverage_precision(conf1, pred == y, tau)
        cov[f"{t:.2f}"] = {"tau": tau, "val_coverage": coverage_precision(vconf, vcorrect, tau)[0],
                           "coverage": c, "precision": prec}
    train_rows = read_csv(art / "train_rows.csv")
    known = [r for r in train_rows if r["path"] in manifest]  # production uploads have no ground truth
    teacher_acc = sum(r["label"] == manifest[r["path"]]["label"] for r in known) / max(len(known), 1)
    val_teacher = np.array([classes.index(r["label"]) for r in train_rows if r["split"] == "val"])
    out = {**m, "classes": classes,
           "ece_before": ece(conf0, p0.argmax(1) == y), "ece_after": ece(conf1, pred == y),
           "temperature": best["temperature"],
           "val_ece_before": best["val_ece_before"], "val_ece_after": best["val_ece_after"],
           "coverage_at_precision": cov,
           "teacher_accuracy": teacher_acc,
           "student_teacher_agreement": float((vp.argmax(1) == val_teacher).mean()) if len(val_teacher) else None,
           "n_train": sum(r["split"] == "train" for r in train_rows), "n_val": len(val_teacher), "n_test": len(rows),
           "label_sources": _count(train_rows, "source"),
           "best_epoch": best.get("best_epoch"), "best_val_acc": best["best_val_acc"],
           "student_ms_per_image": ms, "device": str(device),
           "calibration_warning": best.get("calibration_warning"),
           "reliability": {"before": reliability_bins(conf0, p0.argmax(1) == y),
                           "after": reliability_bins(conf1, pred == y)},
           "notes": "teacher_accuracy: training labels vs the manifest's ground truth (measured, never used). "
                    "student_teacher_agreement: student vs teacher labels on the held-out validation split. "
                    "Thresholds in coverage_at_precision were fitted on validation, then applied to test."}
    out["noise_cost"] = noise_cost(art, x_test, y, m["accuracy"], device)
    write_json(art / "eval.json", out)
    write_csv(art / "test_predictions.csv", ["path", "true", "pred", "confidence", "probs"],
              [{"path": r["path"], "true": r["label"], "pred": classes[k], "confidence": f"{probs[i, k]:.6f}",
                "probs": json.dumps([round(float(v), 6) for v in probs[i]])} for i, (r, k) in enumerate(zip(rows, pred))])
    print_eval_table(out, art)
    return out


def print_eval_table(e, art):
    lines = [f"{'class':<16}{'precision':>10}{'recall':>8}{'f1':>8}{'n':>6}"]
    for c, r in e["report"].items():
        lines.append(f"{c:<16}{r['precision']:>10.3f}{r['recall']:>8.3f}{r['f1']:>8.3f}{r['support']:>6d}")
    lines.append(f"accuracy {e['accuracy']:.4f} | macro-F1 {e['macro_f1']:.4f} | ECE {e['ece_before']:.4f} -> "
                 f"{e['ece_after']:.4f} (T={e['temperature']:.3f}) | teacher label acc {e['teacher_accuracy']:.4f}")
    for t, c in e["coverage_at_precision"].items():
        lines.append(f"target precision {t}: tau {c['tau']:.3f} -> test coverage {c['coverage']:.3f}, precision "
                     f"{_fmt(c['precision'])}")
    if e.get("noise_cost"):
        n = e["noise_cost"]
        lines.append(f"label noise costs the student {n['noise_cost_pts']:+.2f} pts: the same training on ground-truth "
                     f"labels reaches {n['ground_truth_twin_accuracy']:.4f} (measured only)")
    lines.append(f"wrote {art / 'eval.json'}, {art / 'test_predictions.csv'}")
    print("\n".join(lines))


# ----------------------------------------------------------------------------- cascade
HUMAN_FIELDS = ["path", "split", "student_label", "student_conf", "llm_answers", "llm_status", "label_final",
                "source", "turn"]


def fit_tau(cfg, best):
    """tau on the validation split: the lowest threshold reaching --target_precision, or the one
    escalating at most --escalation_budget; or --tau as given."""
    from flywheel.calibrate import softmax, threshold_for_budget, threshold_for_precision, coverage_precision
    vp = softmax(best["val_logits"], best["temperature"])
    conf, correct = vp.max(1), vp.argmax(1) == best["val_labels"]
    if cfg["tau"] is not None:
        tau, rule = cfg["tau"], f"tau={cfg['tau']} fixed by hand"
    elif cfg["escalation_budget"] is not None:
        tau, rule = threshold_for_budget(conf, cfg["escalation_budget"]), f"escalation_budget={cfg['escalation_budget']}"
    else:
        tau, rule = threshold_for_precision(conf, correct, cfg["target_precision"]), f"target_precision={cfg['target_precision']}"
    cov, prec = coverage_precision(conf, correct, tau)
    if tau > 1.0:
        log.warning("no threshold reaches %s on the %d validation images: every item escalates to the LLM", rule, len(conf))
    return tau, rule, {"val_coverage": cov, "val_precision": prec, "n_val": len(conf)}


def pool_rows(P, manifest, upto_turn):
    """The production stream: training images the teacher has not labeled, minus flywheel relabels (a
    pseudo-labeled item stays: the student's own label is no answer, and the next student may doubt it)."""
    used = {r["path"] for r in read_csv(P.need(P.review, "label"))}
    if P.flywheel_labels.exists():
        used |= {r["path"] for r in read_csv(P.flywheel_labels) if int(r["turn"]) <= upto_turn and r["source"] != "pseudo"}
    return [{"path": p, "label": r["label"]} for p, r in sorted(manifest.items()) if r["split"] == "train" and p not in used]


def student_id_of(best) -> str:
    """A content id for a trained student (its validation logits), to key escalation records."""
    import hashlib
    return hashlib.sha256(best["val_logits"].tobytes()).hexdigest()[:16]


def human_answers(P):
    """{path: (label_final, source)} for human-review rows that have an answer."""
    if not P.human_review.exists():
        return {}
    return {r["path"]: (r["label_final"].strip(), r.get("source") or "human")
            for r in read_csv(P.human_review) if (r.get("label_final") or "").strip()}


def teacher_accuracy(P) -> float:
    """Accuracy of accepted teacher labels, estimated from gold pins by the label step (never from the
    manifest's truth); DEFAULT_TEACHER_ACC when no gold pins estimated it."""
    est = (read_json(P.label_summary).get("estimated_accuracy") or {}) if P.label_summary.exists() else {}
    return est.get("accuracy") or DEFAULT_TEACHER_ACC


DEFAULT_TEACHER_ACC = 0.85  # prior accuracy of accepted teacher labels when no gold pins estimated it


class CascadeContext(NamedTuple):
    """What routing one item needs, shared by the splits of one cascade run."""
    sid: str              # student id (escalation records are keyed by it)
    turn: int
    classes: list
    tau: float
    teacher_acc: float    # from gold pins: weighs the LLM's answer against the student's probabilities
    contest_below: float  # an accepted LLM label less likely than this to be right goes to a person
    humans: dict          # {path: (label, source)} answered in human_review.csv
    truth: dict           # {path: label} for --simulate_human (SIMULATED answers), else {}

    def decide(self, probs, e=None):
        from flywheel.cascade import decide
        return decide(probs, self.classes, self.tau, e and e["llm_status"], e and e["llm_label"], self.teacher_acc,
                      self.contest_below)

    def person(self, path):
        """A person's answer so far: (label, source) or (None, None)."""
        if path in self.humans:
            return self.humans[path]
        return (self.truth[path], "simulated_human") if path in self.truth else (None, None)


class CascadeIO(NamedTuple):
    """The files and clients one cascade run writes through."""
    esc: object          # flywheel.cascade.EscalationLog
    teacher: object
    ledger: object
    qc: object
    budget: object
    human_rows: dict     # {path: human_review.csv row}, written whole at the end


class EscalationLogger:
    """label_items' on_done for one split: each item the LLM phase finishes becomes an escalation record,
    appended before the next one finishes (a killed cascade resumes without re-asking). Items with no LLM
    answer (budget stop, errors) are not settled: kept in .unsettled, never logged, asked again next run."""

    def __init__(self, ctx, esc, split, rows, probs):
        self.ctx, self.esc, self.split, self.probs = ctx, esc, split, probs
        self.index = {r["path"]: i for i, r in enumerate(rows)}
        self.unsettled = {}

    def __call__(self, it, verdict):
        from flywheel.cascade import escalation_record
        ctx, probs = self.ctx, self.probs[self.index[it["path"]]]
        st, lab, _, recs = verdict
        d = ctx.decide(probs, {"llm_status": st, "llm_label": lab})
        h_lab, h_src = ctx.person(it["path"]) if d.route == "human" else (None, None)
        rec = escalation_record(ctx.sid, ctx.turn, self.split, it["path"], it["sha256"], probs, ctx.classes, ctx.tau,
                                d.route, st, lab, recs, h_lab, h_src, d.llm_posterior)
        if st == "failed":
            self.unsettled[it["path"]] = rec
        else:
            self.esc.append(rec)


class Settled(NamedTuple):
    items: list        # [{route, final, true}] under the rule in force (final None: waiting for a person)
    plain: list        # the same items under the student-then-LLM rule (the control: same LLM answers)
    n_calls: int       # LLM calls behind this split's escalations
    cost_usd: float


def settle_split(ctx, rows, probs, records, human_rows):
    """Every item's route and answer from the student's probabilities and its escalation record (the route
    is recomputed with the current rule, so changing --contest_below needs no new calls). Human-routed items
    get a row in human_rows (a person's earlier answer kept). -> Settled"""
    from flywheel.cascade import review_row, route_of
    s = Settled([], [], 0, 0.0)
    for i, r in enumerate(rows):
        e = records.get(r["path"])
        d = ctx.decide(probs[i], e)
        if d.route == "student":
            s.items.append({"route": "student", "final": d.label, "true": r["label"]})
            s.plain.append(s.items[-1])
            continue
        s = s._replace(n_calls=s.n_calls + len(e["llm_answers"]), cost_usd=s.cost_usd + e["llm_cost_usd"])
        h_lab, h_src = ctx.person(r["path"])
        person = h_lab or e.get("human_label")
        final = e["llm_label"] if d.route == "llm" else person
        if d.route == "human":
            old = human_rows.get(r["path"], {})
            human_rows[r["path"]] = review_row(
                e, ctx.turn, old.get("label_final") or (h_lab or ""),
                old.get("source") if old.get("label_final") else (h_src or ""))
        s.items.append({"route": d.route, "final": final, "true": r["label"]})
        plain = route_of(float(probs[i].max()), ctx.tau, e["llm_status"])
        s.plain.append({"route": plain, "final": e["llm_label"] if plain == "llm" else person, "true": r["label"]})
    return s


def step_cascade(cfg, P, art=None, turn=None):
    """Route the test split and the unlabeled pool through student -> LLM -> human, with the promoted
    student unless `art` names another. -> escalations.jsonl, human_review.csv, art/cascade.json,
    art/pool_predictions.csv"""
    from flywheel.cascade import EscalationLog
    from flywheel.costs import LLM_ONLY_CALLS_PER_ITEM
    from flywheel.ledger import Ledger
    from flywheel.student import load_student
    from flywheel.teacher import FatalTeacherError
    if art is None:
        art, turn = promoted_artifacts(P.out)
    art, turn = Path(art), turn or 0
    best = load_student(art / "best.pt")
    manifest = load_manifest(P)
    tau, rule, val_stats = fit_tau(cfg, best)
    ctx = CascadeContext(student_id_of(best), turn, best["classes"], tau, teacher_accuracy(P), cfg["contest_below"],
                         human_answers(P), {p: r["label"] for p, r in manifest.items()} if cfg["simulate_human"] else {})
    log.info("cascade: tau = %.4f (%s; validation coverage %.3f, precision %s); student %s; an LLM label below "
             "%.2f probability of being right goes to a person (teacher accuracy %.3f)", tau, rule,
             val_stats["val_coverage"], _fmt(val_stats["val_precision"]), ctx.sid, ctx.contest_below, ctx.teacher_acc)
    ledger, esc = Ledger(P.ledger), EscalationLog(P.escalations)
    teacher = make_teacher(cfg, manifest)
    n_paid, mean_cost, mean_latency_s = ledger.paid_means(teacher.model)
    cost_per_call, llm_call_ms = (mean_cost if n_paid else cfg["usd_per_call"]), 1000 * mean_latency_s
    result = {"tau": tau, "tau_rule": rule, "target_precision": cfg["target_precision"],
              "escalation_budget": cfg["escalation_budget"], **val_stats, "student_id": ctx.sid, "turn": turn,
              "contest_below": ctx.contest_below, "teacher_accuracy_from_gold": ctx.teacher_acc,
              "teacher": {"source": teacher.source, "model": teacher.model, "simulated": teacher.source == "oracle"},
              "simulated_human": bool(cfg["simulate_human"]),
              "inputs": {"calls_per_item_llm_only": LLM_ONLY_CALLS_PER_ITEM, "cost_per_call_usd": cost_per_call,
                         "llm_call_ms": llm_call_ms}}
    io = CascadeIO(esc, teacher, ledger, make_qc(cfg, P), make_budget(cfg, ledger),
                   {r["path"]: r for r in (read_csv(P.human_review) if P.human_review.exists() else [])})
    try:
        for split, rows in {"test": heldout_rows(manifest), "pool": pool_rows(P, manifest, turn)}.items():
            result.update(cascade_split(cfg, P, art, best, ctx, io, manifest, split, rows, result["inputs"]))
    except FatalTeacherError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_TEACHER_FATAL)
    finally:
        write_csv(P.human_review, HUMAN_FIELDS, list(io.human_rows.values()))
        teacher.close()
        esc.close()
        ledger.close()
    result["budget_stopped"] = io.budget.stopped
    write_json(art / "cascade.json", result)
    print_cascade(P, art, result, cfg)
    return result


def cascade_split(cfg, P, art, best, ctx, io, manifest, split, rows, inputs):
    """One split through the cascade: the student on every item, the LLM on those below tau not yet
    answered for this student, then every item settled. -> {split: summary} (+ the sweep and the rule
    comparison for test; pool_predictions.csv for the pool)"""
    import numpy as np
    from flywheel.calibrate import margin
    from flywheel.cascade import rule_comparison, summarize, tau_sweep
    from flywheel.labeling import label_items
    from flywheel.student import pick_device
    per_call = (inputs["calls_per_item_llm_only"], inputs["cost_per_call_usd"])
    if not rows:
        return {split: summarize([], 0, 0.0, *per_call, 0.0, inputs["llm_call_ms"])}
    probs, _, student_ms = student_probs(P, rows, best, pick_device(cfg["device"]), f"student {split}")
    conf, pred = probs.max(1), probs.argmax(1)
    todo = [item(P, manifest, r["path"]) for i, r in enumerate(rows)
            if conf[i] < ctx.tau and io.esc.get(ctx.sid, split, r["path"]) is None]
    logger = EscalationLogger(ctx, io.esc, split, rows, probs)
    label_items(todo, io.teacher, io.ledger, io.qc, io.budget, "cascade", cfg["max_workers"], f"cascade {split} LLM",
                on_done=logger)
    records = {r["path"]: io.esc.get(ctx.sid, split, r["path"]) or logger.unsettled[r["path"]]
               for i, r in enumerate(rows) if conf[i] < ctx.tau}
    s = settle_split(ctx, rows, probs, records, io.human_rows)
    out = {split: {**summarize(s.items, s.n_calls, s.cost_usd, *per_call, student_ms, inputs["llm_call_ms"]),
                   "student_ms_per_item": student_ms}}
    if split == "test":
        esc_items = [x for x in s.items if x["route"] != "student" and x["final"] is not None]
        ls = read_json(P.label_summary) if P.label_summary.exists() else {}
        esc_acc = (sum(x["final"] == x["true"] for x in esc_items) / len(esc_items)) if esc_items else \
            (ls.get("teacher_accuracy") or 1.0)
        out["sweep"] = tau_sweep(conf, pred == np.array([ctx.classes.index(r["label"]) for r in rows]), esc_acc)
        out["sweep_note"] = (f"accuracy at taus other than {ctx.tau:.3f} counts escalated items as right with "
                             f"the measured LLM+human route accuracy {esc_acc:.3f}; student_precision is exact")
        out["rule_comparison"] = rule_comparison(s.items, s.plain, s.n_calls, ctx.contest_below)
    else:
        mg = margin(probs)
        write_csv(art / "pool_predictions.csv", ["path", "pred", "confidence", "margin", "escalated"],
                  [{"path": r["path"], "pred": ctx.classes[pred[i]], "confidence": f"{conf[i]:.6f}",
                    "margin": f"{mg[i]:.6f}", "escalated": int(conf[i] < ctx.tau)} for i, r in enumerate(rows)])
    return out


def print_cascade(P, art, result, cfg):
    for split in ("test", "pool"):
        r = result[split]
        log.info("cascade %s: n=%d routes %s | accuracy %s | LLM calls %d ($%.4f) vs LLM-only %d ($%.4f) | "
                 "~%.0f ms/item%s", split, r["n"], {k: round(v, 3) for k, v in r["routes"].items()}, _fmt(r["accuracy"]),
                 r["llm_calls"], r["cost_usd"], r["llm_only_calls"], r["llm_only_cost_usd"], r["mean_latency_ms"],
                 f" | {r['human_pending']} awaiting a human in {P.human_review}" if r["human_pending"] else "")
    c = result.get("rule_comparison")
    if c:
        log.info("cascade test, same %d LLM calls: combined rule %d wrong answers without a person, %d to a person; "
                 "student-then-LLM %d and %d (%d LLM labels contested, %d of them wrong)", c["llm_calls_both"],
                 c["combined"]["wrong_without_person"], c["combined"]["to_person"],
                 c["student_then_llm"]["wrong_without_person"], c["student_then_llm"]["to_person"],
                 c["contested"], c["contested_llm_wrong"])
    log.info("cascade: wrote %s, %s, %s%s", art / "cascade.json", P.escalations, P.human_review,
             " (SIMULATED human answers)" if cfg["simulate_human"] else "")


# ----------------------------------------------------------------------------- flywheel
FLYWHEEL_LABEL_FIELDS = ["path", "label", "source", "turn"]


def turn_entry(P, art, turn, cfg):
    from flywheel.costs import cost_per_1k
    from flywheel.ledger import Ledger
    e, c = read_json(art / "eval.json"), read_json(art / "cascade.json")
    rows = read_csv(art / "train_rows.csv")
    t = c["test"]
    per_item = (t["cost_usd"] / t["llm_calls"]) if t["llm_calls"] else c["inputs"]["cost_per_call_usd"]
    calls_per_escalated = (t["llm_calls"] / (t["escalation_rate"] * t["n"])) if t["escalation_rate"] and t["n"] else \
        c["inputs"]["calls_per_item_llm_only"]
    spend = Ledger(P.ledger)
    total = spend.total_cost()
    spend.close()
    from flywheel.student import load_student
    return {"turn": turn, "n_labeled": len(rows), "spend_usd": round(total, 6), **validation_score(load_student(art / "best.pt")),
            "accuracy": e["accuracy"], "llm_calls_per_1k": round(1000 * t["llm_calls"] / t["n"], 1) if t["n"] else None,
            "macro_f1": e["macro_f1"], "escalation_rate": t["escalation_rate"], "tau": c["tau"],
            "cascade_accuracy": t["accuracy"],
            "cost_per_1k_usd": round(cost_per_1k(t["escalation_rate"], calls_per_escalated * per_item), 6),
            "llm_only_cost_per_1k_usd": round(1000 * c["inputs"]["calls_per_item_llm_only"] * c["inputs"]["cost_per_call_usd"], 6),
            "label_sources": e["label_sources"], "simulated": c["teacher"]["simulated"] or c["simulated_human"]}


class TurnEvidence(NamedTuple):
    """What a turn's student said about the pool: its predictions and its escalation records."""
    pool: list           # [{path, pred, margin}] from pool_predictions.csv
    escalations: dict    # {path: escalation record} of this student, split pool
    classes: list        # the order of student_probs in the records
    teacher_acc: float   # accuracy of accepted teacher labels, from gold pins (never the manifest's truth)


def turn_evidence(P, art) -> TurnEvidence:
    from flywheel.student import load_student
    preds = read_csv(P.need(art / "pool_predictions.csv", "cascade"))
    sid = read_json(art / "cascade.json")["student_id"]
    esc = {r["path"]: r for r in read_jsonl(P.escalations)[0] if r.get("student_id") == sid and r.get("split") == "pool"}
    return TurnEvidence(preds, esc, load_student(art / "best.pt")["classes"], teacher_accuracy(P))


def retrain_turn(cfg, P, prev, art, k):
    """Train turn k's student into art: continued from the previous student, from turn 0's init, or both
    with the better one on validation kept (the same validation split, never test). -> what was done."""
    import shutil
    from flywheel.student import load_student
    how = "scratch" if cfg["from_scratch"] else cfg["retrain"]
    turn0 = load_student(P.artifacts / "best.pt")["config"]["weights"]  # scratch = the init turn 0 started from
    inits = {"continue": str(prev / "best.pt"), "scratch": turn0}
    if how != "best":
        step_train(cfg, P, art=art, turn=k, init=inits[how], resume=False)
        return {"choice": how}
    val = {}
    for name, init in inits.items():
        step_train(cfg, P, art=art / f"_{name}", turn=k, init=init, resume=False)
        val[name] = validation_score(load_student(art / f"_{name}" / "best.pt"))
    win = max(val, key=lambda n: (better_key(val[n]), n == "continue"))  # a tie keeps continuing
    for f in (art / f"_{win}").iterdir():
        dst = art / f.name
        if dst.is_dir():
            shutil.rmtree(dst)
        os.replace(f, dst)
    for name in inits:
        shutil.rmtree(art / f"_{name}", ignore_errors=True)
    log.info("flywheel turn %d: kept the %s student (validation accuracy / NLL: %s)", k, win,
             ", ".join(f"{n} {v['val_acc']:.4f} / {v['val_nll']:.4f}" for n, v in val.items()))
    return {"choice": win, "val_acc": val}  # {candidate: {val_acc, val_nll}}


def step_flywheel(cfg, P):
    """Turns 1..--turns: relabel targeted pool items, retrain, recalibrate, re-evaluate, re-run the cascade.
    -> artifacts/turn_<k>/, flywheel_labels.csv, artifacts/flywheel.json"""
    from flywheel.cascade import NONE_OF_THESE, paid_labels, pick_relabels
    from flywheel.labeling import label_items
    from flywheel.ledger import Ledger
    fly = read_json(P.flywheel) if P.flywheel.exists() else {"turns": []}
    if not fly["turns"]:
        if not P.turn0.cascade.exists():
            step_cascade(cfg, P)
        P.need(P.turn0.eval, "eval")
        fly["turns"].append(turn_entry(P, P.artifacts, 0, cfg))
        write_json(P.flywheel, fly)
        record_promotion(P)
    manifest = load_manifest(P)
    done = {t["turn"] for t in fly["turns"]}
    for k in range(1, cfg["turns"] + 1):
        if k in done:
            log.info("flywheel turn %d already done (see %s); raise --turns for more", k, P.flywheel)
            continue
        prev = P.artifacts if k == 1 else P.artifacts / f"turn_{k - 1}"
        art = P.artifacts / f"turn_{k}"
        if not pool_rows(P, manifest, k - 1):
            log.info("flywheel turn %d skipped: no unlabeled training images are left to relabel (every one is "
                     "labeled already); label fewer (--max_label) or add images to grow the pool", k)
            break
        if not (prev / "cascade.json").exists():
            step_cascade(cfg, P, prev, turn=k - 1)
        ev = turn_evidence(P, prev)
        doubt_below = max(0.5, cfg["contest_below"])  # an LLM label less likely than this to be right is no answer
        # answers the cascade already paid for train at no new cost; the picks go to items without one
        paid = paid_labels(ev.pool, ev.escalations, ev.classes, ev.teacher_acc, doubt_below) \
            if cfg["paid_answers"] == "on" else {}
        picked, why = pick_relabels([r for r in ev.pool if r["path"] not in paid], ev.escalations, cfg["relabel_n"],
                                    cfg["relabel_strategy"],
                                    [p for p, (_, src) in human_answers(P).items() if src != "simulated_human"],
                                    cfg["seed"] + k, ev.classes, ev.teacher_acc,
                                    doubt_below=doubt_below)
        assert all(manifest[p]["split"] == "train" for p in picked), "flywheel picked a test image"
        ledger, teacher, qc = Ledger(P.ledger), make_teacher(cfg, manifest), make_qc(cfg, P)
        budget = make_budget(cfg, ledger)
        spent0 = ledger.total_cost()
        try:
            verdicts = label_items([item(P, manifest, p) for p in picked], teacher, ledger, qc, budget, "flywheel",
                                   cfg["max_workers"], f"flywheel turn {k} relabel")
            # what the picked items' answers cost, whether this turn or the cascade before it paid for them
            picked_usd = ledger.cost_of({manifest[p]["sha256"] for p in [*picked, *paid]})
        finally:
            teacher.close()
            ledger.close()
        humans = human_answers(P)
        new = []
        for p in picked:
            if p in humans and humans[p][0] == NONE_OF_THESE:
                continue  # a person said it is none of the classes: it never trains
            if p in humans:
                lab, src = humans[p]
                if lab not in cfg["classes"]:
                    raise SystemExit(f"error: {P.human_review}: label_final {lab!r} for {p} is not one of {cfg['classes']} "
                                     f"or {NONE_OF_THESE}")
                new.append({"path": p, "label": lab, "source": "simulated_human" if src == "simulated_human" else "human", "turn": k})
            elif verdicts[p][0] == "accepted":
                new.append({"path": p, "label": verdicts[p][1], "source": "escalation", "turn": k})
        n_from_picks = len(new)
        new += [{"path": p, "label": humans[p][0] if p in humans else lab,
                 "source": humans[p][1] if p in humans else "cascade", "turn": k} for p, lab in sorted(paid.items())
                if humans.get(p, ("",))[0] != NONE_OF_THESE]
        taken = {r["path"] for r in new} | set(picked)
        pseudo = [{"path": r["path"], "label": r["pred"], "source": "pseudo", "turn": k} for r in ev.pool
                  if r["path"] not in taken and r["path"] not in ev.escalations and r["escalated"] == "0"] \
            if cfg["pseudo_labels"] == "on" else []
        new += pseudo
        old = read_csv(P.flywheel_labels) if P.flywheel_labels.exists() else []
        old = [r for r in old if int(r["turn"]) != k]  # a crashed turn k is redone whole
        served = production_labels(P, manifest, cfg["classes"], k, {r["path"] for r in old + new})
        new += served
        write_csv(P.flywheel_labels, FLYWHEEL_LABEL_FIELDS, old + new)
        relabel_usd = budget.spent - spent0
        log.info("flywheel turn %d: %d pool answer(s) the cascade already paid for; picked %d pool items %s; "
                 "%d label(s) in all (%s); relabeling cost $%.4f; budget stop: %s", k, len(paid), len(picked), why,
                 len(new), json.dumps(_count(new, "source")), relabel_usd, budget.stopped)
        retrain = retrain_turn(cfg, P, prev, art, k)
        rows = read_csv(art / "train_rows.csv")
        assert all(split_of(manifest, r["path"]) in ("train", "production") for r in rows), "a test image entered training"
        step_eval(cfg, P, art)
        step_cascade(cfg, P, art, turn=k)
        entry = turn_entry(P, art, k, cfg)
        entry.update(new_labels=len(new), paid_labels=len(paid), picks_labeled=n_from_picks, serving_labels=len(served),
                     pseudo_labels=len(pseudo),
                     picked=why, relabel_strategy=cfg["relabel_strategy"], retrain=retrain,
                     relabel_usd=round(relabel_usd, 6), picked_answers_usd=round(picked_usd, 6),
                     labels_per_usd=round((len(new) - len(pseudo)) / picked_usd, 1) if picked_usd > 0 else None)
        fly["turns"].append(entry)
        write_json(P.flywheel, fly)
        log.info("flywheel: promoted student is turn %d (best validation accuracy)", record_promotion(P).turn)
    print_flywheel(fly)
    return fly


def split_of(manifest, path):
    """train / test from the manifest; production for what --step serve stored; unknown otherwise."""
    if path in manifest:
        return manifest[path]["split"]
    return "production" if path.startswith("production/") else "unknown"


def production_labels(P, manifest, classes, k, taken):
    """Labels serving collected (escalations.jsonl split production): a person's answer from
    human_review.csv, else an LLM answer QC accepted. An upload whose bytes are a test image's never
    trains. -> flywheel_labels rows for turn k."""
    test_shas = {r["sha256"] for r in manifest.values() if r["split"] == "test"}
    humans = human_answers(P)
    out = {}
    for r in read_jsonl(P.escalations)[0] if P.escalations.exists() else []:
        p = r.get("path", "")
        if r.get("split") != "production" or p in taken or p in out or not (P.out / p).exists():
            continue
        if {r.get("sha256"), r.get("upload_sha256")} & test_shas:
            log.warning("flywheel: production upload %s is a test image; it does not train", p)
            continue
        if p in humans and humans[p][0] in classes:
            out[p] = {"path": p, "label": humans[p][0], "source": "human", "turn": k}
        elif r.get("route") == "llm" and r.get("llm_label") in classes:
            out[p] = {"path": p, "label": r["llm_label"], "source": "escalation", "turn": k}
    if out:
        log.info("flywheel turn %d: %d label(s) from serving (%s)", k, len(out), json.dumps(_count(list(out.values()), "source")))
    return list(out.values())


def print_flywheel(fly):
    print(f"{'turn':>4} {'labeled':>8} {'spend $':>9} {'test acc':>9} {'macro-F1':>9} {'escalation':>11} {'$/1k':>9}")
    for t in fly["turns"]:
        print(f"{t['turn']:>4} {t['n_labeled']:>8} {t['spend_usd']:>9.4f} {t['accuracy']:>9.4f} {t['macro_f1']:>9.4f} "
              f"{t['escalation_rate']:>11.3f} {t['cost_per_1k_usd']:>9.4f}")


# ----------------------------------------------------------------------------- export
EXPORT_CHECK_IMAGES = 64
EXPORT_TOLERANCE = 1e-3  # max |calibrated probability difference| between the exported graphs and torch


def prep_sharpens(cfg, P):
    """Whether prep sharpened this run's images (prep.json), which the exported graph must repeat."""
    settings = read_json(P.prep_json).get("settings", {}) if P.prep_json.exists() else {}
    return settings.get("sharpen", not cfg["no_sharpen"])


def step_export(cfg, P):
    """best.pt -> artifacts/mobilenet.onnx and mobilenet.ts (raw uint8 pixels in, preprocessing inside the
    graph, calibrated logits out, dynamic batch and size), export.json: each checked on real test images
    against the PyTorch student as training runs it (normalised images in, no folding), and the graph on
    raw small images against that student on prep's JPEGs of them."""
    import numpy as np
    import torch
    from flywheel.calibrate import softmax
    from flywheel.export import (CalibratedStudent, export_onnx, export_torchscript, load_images, load_torchscript, ort_session,
                                prep_consistency, serving_graph)
    from flywheel.ood import MIN_SIDE, fit_ood
    from flywheel.student import IMAGENET_MEAN, IMAGENET_STD, load_student, model_from_checkpoint, normalize
    art, turn = promoted_artifacts(P.out)
    best = load_student(art / "best.pt")  # the promoted student: the one that ships
    size, sharpen = best["model_args"]["img_size"], prep_sharpens(cfg, P)
    graph = serving_graph(model_from_checkpoint(best), best["temperature"], size, sharpen)
    student = CalibratedStudent(model_from_checkpoint(best), best["temperature"]).eval()  # the reference
    meta = {"classes": best["classes"], "temperature": best["temperature"], "img_size": size, "sharpen": sharpen,
            "input": "image: uint8 [B,H,W,3] RGB, any H and W. At img_size x img_size it is taken as prep wrote it; "
                     "any other size is resized (antialiased bicubic) and sharpened as prep did. Then (x/255 - mean)/std "
                     "(the graph subtracts 255*mean; the first convolution's weights carry 1/(255*std))",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "output": "calibrated logits (logits / temperature)",
            "source": "cifar_distill " + str(art / "best.pt"), "turn": turn}
    export_onnx(graph, P.onnx, size, meta)
    export_torchscript(graph, P.ts)
    rows = heldout_rows(load_manifest(P))[:EXPORT_CHECK_IMAGES]
    if not rows:
        raise SystemExit("error: no test images to check the export against; rerun --step prep")
    files = [P.out / r["path"] for r in rows]
    x = load_images(files)
    with torch.no_grad():
        ref = softmax(student(normalize(torch.from_numpy(x).permute(0, 3, 1, 2))).numpy())
    session = ort_session(P.onnx)
    outs = {"onnx": softmax(session.run(None, {"image": x})[0]),
            "torchscript": softmax(load_torchscript(P.ts)(torch.from_numpy(x)).detach().numpy())}
    result = {"n_images": len(rows), "temperature": best["temperature"], "classes": best["classes"],
              "turn": turn, "student": str(art / "best.pt"), "val_acc": best["best_val_acc"], "sharpen": sharpen,
              "tolerance": EXPORT_TOLERANCE,
              "reference": "the PyTorch student as training runs it: normalised images in, nothing folded"}
    for name, path in (("onnx", P.onnx), ("torchscript", P.ts)):
        result[name] = {"path": str(path), "max_abs_diff": float(np.abs(outs[name] - ref).max()),
                        "agreement": float((outs[name].argmax(1) == ref.argmax(1)).mean()),
                        "bytes": path.stat().st_size}
    result["raw_input"] = prep_consistency(student, session, files, size, sharpen)
    log.info("export: ONNX max |dp| %.2e, agreement %.3f; TorchScript max |dp| %.2e, agreement %.3f on %d test "
             "images -> %s, %s, %s", result["onnx"]["max_abs_diff"], result["onnx"]["agreement"],
             result["torchscript"]["max_abs_diff"], result["torchscript"]["agreement"], len(rows), P.onnx, P.ts, P.export)
    r = result["raw_input"]
    log.info("export: on raw %dx%d copies of those images, the graph agrees with the student on prep's JPEGs of them "
             "for %.1f%% (max |dp| %.3f, mean %.4f)", *r["size_wh"], 100 * r["agreement"], r["max_abs_diff"],
             r["mean_abs_diff"])
    trained = read_csv(art / "train_rows.csv")
    ood = fit_ood([P.out / r["path"] for r in trained if r["split"] == "train"],
                  [P.out / r["path"] for r in trained if r["split"] == "val"], cfg["seed"])
    ood.save(P.ood)
    result["ood"] = {"path": str(P.ood), "bank": len(ood.bank), "threshold": ood.threshold, "quantile": ood.val_quantile}
    write_json(P.export, result)
    log.info("export: serving sends an upload to a person when it is under %d px, or further than %.1f grey levels "
             "from all %d training thumbnails (the %gth percentile of validation) -> %s", MIN_SIDE, ood.threshold,
             len(ood.bank), 100 * ood.val_quantile, P.ood)
    bad = [n for n in ("onnx", "torchscript") if result[n]["max_abs_diff"] > EXPORT_TOLERANCE]
    if bad:
        raise SystemExit(f"error: the exported {', '.join(bad)} graph differs from PyTorch by more than "
                         f"{EXPORT_TOLERANCE} in probability (see {P.export}); do not ship it")
    return result


# ----------------------------------------------------------------------------- report
def _pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"




def step_report(cfg, P):
    """Every artifact of the run -> report.md (plots embedded) and datacard.md. No number is typed by
    hand: each comes from the JSON file named in its section."""
    from flywheel.costs import breakeven_report
    from flywheel.plots import plot_run
    from flywheel.student import load_student
    ls = read_json(P.need(P.label_summary, "label"))
    art, turn = promoted_artifacts(P.out)  # every student figure is of the promoted student
    ev = read_json(P.need(art / "eval.json", "eval"))
    prep = read_json(P.need(P.prep_json, "prep"))
    cas = read_json(art / "cascade.json") if (art / "cascade.json").exists() else None
    fly = read_json(P.flywheel) if P.flywheel.exists() else None
    speed = read_json(art / "speed.json") if (art / "speed.json").exists() else None
    exp = read_json(P.export) if P.export.exists() else None
    best = load_student(art / "best.pt")
    plots, _ = plot_run(art, P.flywheel)  # the promoted turn's own plots, drawn from its artifacts
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
    for k in ("weights", "epochs", "batch_size", "lr", "weight_decay", "val_frac", "seed", "img_size", "device"):
        L.append(f"| {k} | {c.get(k)} |")
    L += [f"| classes | {', '.join(best['classes'])} |", f"| teacher | {ls['source']}: {ls['model']} (prompt {ls['prompt_version']}) |",
          f"| second pass | {ls['second_pass']}, accept at mean confidence >= {ls['conf_thresh']} |", ""]
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
          f"| agreement rate | {_fmt(ls['agreement_rate'], 4)} |",
          f"| accepted-label accuracy | {_fmt(ls['teacher_accuracy'], 4)} |",
          f"| first-pass accuracy | {_fmt(ls['pass1_accuracy'], 4)} |",
          f"| gold accuracy | {_fmt(ls['gold_accuracy'], 4)} |",
          f"| yield (accepted / requested) | {_pct(ls.get('yield'))} |",
          "| accepted-label accuracy estimated from gold pins | "
          + (f"{_fmt(ls['estimated_accuracy']['accuracy'], 4)} (95% CI {ls['estimated_accuracy']['ci95'][0]}-"
             f"{ls['estimated_accuracy']['ci95'][1]})" if ls.get("estimated_accuracy") else "n/a (no gold pins)") + " |",
          f"| QC rule | {(ls.get('qc_rule') or {}).get('why') or ls['second_pass']} |", ""]
    L += [f"## Student (turn {turn} eval.json, official test split)", "", "| metric | value |", "|---|---|",
          f"| accuracy | {ev['accuracy']:.4f} |", f"| macro-F1 | {ev['macro_f1']:.4f} |",
          f"| ECE before | {ev['ece_before']:.4f} |", f"| ECE after | {ev['ece_after']:.4f} |",
          f"| temperature | {ev['temperature']:.4f} |", f"| n_train | {ev['n_train']} |", f"| n_val | {ev['n_val']} |",
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
        L.append(f"| {t} | {cv['tau']:.4f} | {cv['coverage']:.4f} | {_fmt(cv['precision'], 4)} |")
    L.append("")
    if cas:
        L += [f"## Cascade (cascade.json, tau = {cas['tau']:.4f} by {cas['tau_rule']})", "",
              "| split | n | student | llm | human | accuracy | LLM calls | LLM-only calls | cost | LLM-only cost | ms/item |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
        for split in ("test", "pool"):
            r = cas[split]
            L.append(f"| {split} | {r['n']} | {_pct(r['routes']['student'])} | {_pct(r['routes']['llm'])} | "
                     f"{_pct(r['routes']['human'])} | {_fmt(r['accuracy'], 4)} | {r['llm_calls']} | {r['llm_only_calls']} | "
                     f"{usd(r['cost_usd'])} | {usd(r['llm_only_cost_usd'])} | {r['mean_latency_ms']:.1f} |")
        L += ["", "Route accuracy on test: " + ", ".join(f"{k} {_fmt(v, 4)}" for k, v in cas["test"]["route_accuracy"].items())
              + (f"; {cas['test']['human_pending']} item(s) still wait for a human in human_review.csv" if cas["test"]["human_pending"] else ""), ""]
        L += rule_comparison_lines(cas.get("rule_comparison"))
    if fly:
        L += ["## Flywheel turns (flywheel.json)", "", "| turn | labeled | spend | test accuracy | macro-F1 | escalation rate | $ per 1k served |",
              "|---|---|---|---|---|---|---|"]
        for t in fly["turns"]:
            L.append(f"| {t['turn']} | {t['n_labeled']} | {usd(t['spend_usd'])} | {t['accuracy']:.4f} | {t['macro_f1']:.4f} | "
                     f"{t['escalation_rate']:.4f} | {usd(t['cost_per_1k_usd'])} |")
        L.append("")
    L += ["## Throughput and breakeven", ""]
    if exp:
        L += [f"Export (export.json): ONNX max |dp| {exp['onnx']['max_abs_diff']:.2e}, agreement {exp['onnx']['agreement']:.4f}; "
              f"TorchScript max |dp| {exp['torchscript']['max_abs_diff']:.2e}, agreement {exp['torchscript']['agreement']:.4f}.", ""]
    if speed:
        m = speed["machine"]
        L += [f"speed.json ({m['cpu']}, {m['cores']} cores, torch {m['torch']}, onnxruntime {m['onnxruntime']}, "
              f"{speed['img_size']}px):", "", "| backend | device | model img/s | e2e img/s | p50 ms b1 | p95 ms b1 |",
              "|---|---|---|---|---|---|"]
        for r in speed["results"]:
            L.append(f"| {r['backend']} | {r['device']} | {r['model_img_per_s']:.1f} | {r['e2e_img_per_s']:.1f} | "
                     f"{r['p50_ms_b1']:.2f} | {r['p95_ms_b1']:.2f} |")
        L.append("")
    else:
        L += ["No speed.json: run `uv run simple_speed_test.py --root " + str(P.out) + "` to measure throughput.", ""]
    if cas:
        be = breakeven_report([10_000, 100_000, 1_000_000], root=str(P.out),
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
    L += ["## Plots", ""]
    for name, path in plots.items():
        if str(path).endswith(".png"):
            L.append(f"![{name}]({Path(path).relative_to(P.out).as_posix()})")
    atomic_write_bytes(P.report, ("\n".join(L) + "\n").encode())
    write_datacard(P, ls, ev, prep, best, cas)
    log.info("report: wrote %s, %s", P.report, P.datacard)
    return P.report


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
        L.append(f"| {label} | {t['wrong_without_person']} | {t['to_person']} | {_fmt(t['accuracy_without_person'], 4)} |")
    return L + ["", f"{rc['contested']} LLM label(s) contested; the LLM was wrong on {rc['contested_llm_wrong']} of them.", ""]


def write_datacard(P, ls, ev, prep, best, cas):
    import numpy as np
    cm = np.array(ev["confusion_matrix"])
    off = [(cm[i, j], ev["classes"][i], ev["classes"][j]) for i in range(len(cm)) for j in range(len(cm)) if i != j and cm[i, j]]
    top = sorted(off, reverse=True)[:3]
    src = ev["label_sources"]
    L = ["# Datacard", "",
         f"**Dataset.** {'CIFAR-100 (python version), fine classes' if prep['settings']['dataset'] == 'cifar100' else 'image folder ' + prep['source']}: "
         f"{', '.join(prep['classes'])}. Train/test counts: "
         + "; ".join(f"{s}: {sum(c.values())}" for s, c in prep["counts"].items()) + ". "
         f"Images upscaled to {prep['settings']['img_size']}px (bicubic{', unsharp mask' if prep['settings']['sharpen'] else ''}), JPEG q90.",
         "", "**Label sources used for training** (artifacts/train_rows.csv): " + ", ".join(f"{k} {v}" for k, v in src.items()) + ".",
         "", f"**Teacher.** {ls['model']} (source `{ls['source']}`{', SIMULATED' if ls.get('simulated') else ''}), prompt version "
         f"{ls['prompt_version']}, {ls['calls']} paid calls, {usd(ls['cost_usd'])}{' (estimated)' if ls['cost_estimated'] else ''}.",
         "", "**Acceptance rules.** Each image gets two teacher passes: the classes in the given order at temperature 0, then "
         "in another order at a temperature above 0" + (" (adaptive: the second pass only below the confidence threshold, plus an audit fraction)" if ls["second_pass"] == "adaptive" else "")
         + (f". Rule in force (--second_pass fitted): {ls['qc_rule']['why']}; a first answer below the threshold is accepted "
            f"only when a second answer{' from ' + ls['second_model'] if ls.get('second_model') else ''} agrees"
            if ls.get("qc_rule") else f". A label is accepted when the passes agree and their mean confidence is >= {ls['conf_thresh']}")
         + (f". Estimated accepted-label accuracy from gold pins: {ls['estimated_accuracy']['accuracy']} (95% CI "
            f"{ls['estimated_accuracy']['ci95'][0]}-{ls['estimated_accuracy']['ci95'][1]})" if ls.get("estimated_accuracy") else "")
         + ". Replies that are "
         "not JSON or name no listed class are invalid and never accepted. A person's edit of `label_final` in "
         "review_labels.csv overrides the teacher (source `human`). Flywheel turns add pool items the cascade escalated "
         "(source `escalation`) or a person answered (`human`; `simulated_human` offline). Test images never enter training.",
         "", "**Provenance.** Every teacher call is a line of labels.jsonl with image sha256, pass, model, host, prompt "
         "version, raw reply, tokens, cost and time; every escalation a line of escalations.jsonl.",
         "", "**Known limitations.**",
         "- CIFAR-100's own labels are noisy and some classes overlap visually (e.g. apple / orange / pear at 32px).",
         f"- The sources are 32x32 pixels upscaled to {prep['settings']['img_size']}px: the teacher and the student see "
         "interpolated detail, not real resolution.",
         f"- Accepted teacher labels were {_fmt(ls['teacher_accuracy'], 4)} accurate against ground truth; the student learns "
         "their errors too.",
         "- Most frequent test confusions (true -> predicted: count): " + (", ".join(f"{a} -> {b}: {n}" for n, a, b in top) or "none") + ".",
         f"- {'Everything here was produced with a SIMULATED teacher; rerun with a real LLM before drawing conclusions.' if ls.get('simulated') else 'A single teacher model: its biases are shared by both passes and are not caught by their agreement.'}"]
    atomic_write_bytes(P.datacard, ("\n".join(L) + "\n").encode())


# ----------------------------------------------------------------------------- serve

def step_serve(cfg, P):
    """The promoted student in ONNX Runtime behind HTTP (flywheel/service.py): student, then the LLM through
    the label step's ledger, QC and budget, then a person at /review. Blocks until Ctrl-C.
    -> production/, escalations.jsonl (split production), human_review.csv"""
    import uvicorn
    from flywheel.cascade import EscalationLog
    from flywheel.ledger import Ledger
    from flywheel.export import ort_session
    from flywheel.ood import OODModel
    from flywheel.service import Service, build_app, student_warnings
    from flywheel.student import load_student
    art, turn = promoted_artifacts(P.out)
    best = load_student(P.need(art / "best.pt", "train"))
    exported = read_json(P.need(P.export, "export"))
    if exported.get("turn", 0) != turn:
        raise SystemExit(f"error: {P.onnx} holds turn {exported.get('turn', 0)}'s student but turn {turn} is promoted; "
                         f"run `uv run cifar_distill.py --step export --out_dir {P.out}` first")
    tau, rule, _ = fit_tau(cfg, best)
    manifest = load_manifest(P)
    session = ort_session(P.onnx, threads=cfg["num_threads"], spin=False)
    if [i.name for i in session.get_inputs()] != ["image"]:
        raise SystemExit(f"error: {P.onnx} was exported before the graph took raw uint8 images; rerun "
                         f"`uv run cifar_distill.py --step export --out_dir {P.out}`")
    ledger, esc = Ledger(P.ledger), EscalationLog(P.escalations)
    teacher = make_teacher(cfg, manifest)
    ood = OODModel.load(P.ood) if P.ood.exists() else None
    if ood is None:
        log.warning("serve: no %s (exported before it existed): only degenerate sizes are caught as unlike training; "
                    "rerun --step export", P.ood)
    warns = student_warnings(best.get("calibration_warning"), len(best["val_labels"]), tau)
    for w in warns:
        log.warning("serve: this student comes with a warning (also in /health): %s", w)
    svc = Service(P.out, session, best["classes"], tau, best["model_args"]["img_size"], prep_sharpens(cfg, P), teacher, ledger,
                  make_qc(cfg, P), make_budget(cfg, ledger), esc, student_id_of(best), turn, HUMAN_FIELDS,
                  int(cfg["max_upload_mb"] * 2**20), teacher_accuracy(P), cfg["contest_below"], ood, warns)
    log.info("serve: turn %d's student (tau %.4f, %s) on http://%s:%d  (/v1/classify, /health, /review); "
             "escalations -> %s", turn, tau, rule, cfg["host"], cfg["port"], P.escalations)
    try:
        uvicorn.run(build_app(svc), host=cfg["host"], port=cfg["port"], log_level="warning", access_log=False)
    finally:
        teacher.close()
        ledger.close()
        esc.close()


# ----------------------------------------------------------------------------- main

def run_step(name, cfg, P):
    return {"prep": step_prep, "label": step_label, "train": step_train, "eval": step_eval, "cascade": step_cascade,
            "flywheel": step_flywheel, "export": step_export, "report": step_report, "serve": step_serve,
            "merge": step_merge}[name](cfg, P)


SPENDING_STEPS = ("label", "cascade", "flywheel", "all", "serve", "merge")  # they write the ledger: one process at a time
EXIT_INTERRUPTED = 130


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser()
    if "--demo" in argv:
        parser.set_defaults(**DEMO, data_root=None)
    cfg = vars(cli.parse(parser, argv))
    logging.basicConfig(level=cfg["log_level"], format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if cfg["log_level"] != "DEBUG":  # httpx logs every request at INFO: the progress bar is the output
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)
    from dotenv import find_dotenv, load_dotenv
    load_dotenv(find_dotenv(usecwd=True))  # OPENROUTER_API_KEY may live in ./.env; the environment wins
    if cfg["demo"]:
        from flywheel.data import write_digits_folder
        cfg["data_root"] = cfg["data_root"] or str(Path(cfg["out_dir"]) / "digits")
        write_digits_folder(cfg["data_root"])
    cfg = validate(cfg)
    P = Paths(cfg["out_dir"])
    P.out.mkdir(parents=True, exist_ok=True)
    if cfg["num_threads"]:
        import torch
        torch.set_num_threads(cfg["num_threads"])
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if distributed:  # torchrun: join the group; rank 0 alone logs progress
        from flywheel.student import start_distributed
        if start_distributed(cfg["device"])[0] != 0:
            logging.getLogger().setLevel(logging.WARNING)
    steps = STEPS if cfg["step"] == "all" else [cfg["step"]]
    # a rerun with unchanged inputs and settings does nothing; a dry run, a shard, a resume or torchrun always run
    stamped = not (cfg["dry_run"] or cfg["shard"] or cfg["resume"] or distributed)
    lock = RunLock(P.out, cfg["step"]) if cfg["step"] in SPENDING_STEPS and not cfg["dry_run"] else None
    with _sigterm_as_interrupt():
        try:
            if lock is not None:
                lock.acquire()
            for s in steps:
                made_from = (lambda: fingerprint(step_files(P, s, cfg["data_root"], cfg["gold_csv"]),
                                                 {k: cfg[k] for k in SHAPED_BY[s]}, P.out)) if stamped and s in SHAPED_BY else None
                last = made_from and not cfg["force"] and unchanged(P, s, made_from())
                if last:
                    log.info("=== step %s: inputs and settings unchanged since %s; nothing to do (--force reruns it) ===",
                             s, last["at"])
                    continue
                t0 = time.time()
                log.info("=== step %s ===", s)
                run_step(s, cfg, P)
                if made_from:
                    write_stamp(P, s, made_from())  # after the step: what its outputs were made from
                log.info("=== step %s done in %.1fs ===", s, time.time() - t0)
                if cfg["step"] == "all" and s == "label" and cfg["dry_run"]:
                    break
        except FlywheelError as e:  # the package's own errors: a problem the user fixes, named with its fix
            raise SystemExit(f"error: {e}")
        except KeyboardInterrupt:
            # the step already let calls in flight land and rewrote its outputs from what was paid
            print(f"interrupted: stopped step {cfg['step']}; everything paid for is in {P.ledger}, and a rerun of "
                  f"the same command resumes without paying twice.", file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPTED)
        finally:
            if lock is not None:
                lock.release()
            _leave_distributed()


def _leave_distributed():
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


class _sigterm_as_interrupt:
    """SIGTERM (what `kill` and process managers send) stops a step the way Ctrl-C does."""

    def __enter__(self):
        import signal
        import threading
        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGTERM, self._raise)

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc):
        import signal
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)


if __name__ == "__main__":
    try:
        main()
    except FlywheelError as e:  # a problem the user fixes: the message, not a traceback
        raise SystemExit(f"error: {e}")

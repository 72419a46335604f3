"""cifar_distill's reusable machinery: the parts a user keeps when swapping CIFAR for their own data.

data.py       CIFAR-100 archive (download, safe extract, Python-2 pickles) and image-folder readers
teacher.py    OpenAI-compatible client (prompt, request, parse, retries) and the offline oracle
ledger.py     append-only JSONL ledger and its SQLite index, shard merging, per-image QC verdicts, the review CSV
imcache.py    the memory-mapped uint8 image cache every step reads in batches
student.py    MobileNetV3-Small, GPU/CPU augmentation, training loop (DDP under torchrun), checkpoints
calibrate.py  temperature scaling, ECE, thresholds, coverage, classification metrics (pure numpy)
labeling.py   dual-pass QC labeling through teacher, ledger and budget, a bounded window of calls in flight
quality.py    the QC rule fitted on gold pins, and the held-out model (confident learning)
cascade.py    routing student -> LLM -> human, the escalation log, relabel selection
serve.py      the exported serving graph (raw uint8 in, preprocessing inside), ONNX/TorchScript export
server.py     the ASGI app behind --step serve and its review page
costs.py      the cost model (pure functions)
plots.py      the PNGs that plot_confusion.py and the report step draw
run.py        the run folder: every file's path, the promoted turn, step stamps (what each output was made from)
cli.py        the command line built from one table: grouped help, one-line errors with the closest valid value
ood.py        inputs unlike the training images: degenerate sizes and pixel features far from every one


The package raises its own exceptions; cifar_distill.py alone turns them into messages and exit codes.
"""


class FlywheelError(RuntimeError):
    """A problem the user fixes (missing input, bad data, a run folder in use); the message names the fix."""

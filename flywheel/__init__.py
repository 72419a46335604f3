"""cifar_distill's reusable machinery: the parts a user keeps when swapping CIFAR for their own data.

data.py       CIFAR-100 archive (download, safe extract, Python-2 pickles) and image-folder readers
teacher.py    OpenAI-compatible client (prompt, request, parse, retries) and the offline oracle
ledger.py     append-only JSONL ledger, per-image QC verdicts, the review CSV round trip
student.py    MobileNetV3-Small, uint8 tensor cache, GPU/CPU augmentation, training loop, checkpoints
calibrate.py  temperature scaling, ECE, thresholds, coverage, classification metrics (pure numpy)
cascade.py    routing student -> LLM -> human and the escalation log
costs.py      the cost model (pure functions)
plots.py      the PNGs that plot_confusion.py and the report step draw
"""

"""What the bench scripts share: mean ± std over seeds, printed the same way everywhere."""
import logging
import os
import statistics
import tempfile
from pathlib import Path

# the student flags of each initialisation the benches compare
INITS = {"scratch": ["--student", "mobilenet_v3_small", "--weights", "none"],
         "pretrained": ["--student", "efficientnet_lite0", "--weights", "imagenet"]}


def quiet_offline_workdir(prefix) -> Path:
    """A fresh temp folder for a bench that runs the pipeline in-process against the loopback teacher:
    the pipeline's logs and bars are silenced (the bench prints its own table) and a dummy key is set."""
    logging.disable(logging.WARNING)
    os.environ["OPENROUTER_API_KEY"] = "sk-bench-loopback"
    os.environ.setdefault("TQDM_DISABLE", "1")
    return Path(tempfile.mkdtemp(prefix=prefix))


def over_seeds(prefix, one_seed, n):
    """one_seed(workdir, seed) for seeds 0..n-1 in a fresh quiet offline folder (quiet_offline_workdir),
    removed afterwards. -> ([result per seed], seconds)"""
    import shutil
    import time
    tmp, t0 = quiet_offline_workdir(prefix), time.time()
    try:
        return [one_seed(tmp, s) for s in range(n)], time.time() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def mean_std(xs, scale=1.0, nd=1) -> str:
    """'mean ± std' of the non-None values (std 0 for one value); 'n/a' when there are none.

    >>> mean_std([0.8, 0.9], 100), mean_std([None]), mean_std([1.5], nd=2)
    ('85.0 ± 7.1', 'n/a', '1.50 ± 0.00')
    """
    xs = [x * scale for x in xs if x is not None]
    if not xs:
        return "n/a"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.{nd}f} ± {sd:.{nd}f}"


def memoise_embeddings():
    """Benches label the same images again and again: compute each image's backbone embedding once per process
    (keyed by the file's sha256, so copies of a run folder share them). The figures do not change."""
    import hashlib

    import numpy as np

    from flywheel import inference
    real, memo = inference.embed_files, {}

    def embed(files, **kw):
        files = list(files)
        keys = [hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files]
        todo = {k: f for f, k in zip(files, keys) if k not in memo}
        if todo:
            memo.update(zip(todo, real(list(todo.values()), **kw)))
        return np.stack([memo[k] for k in keys]) if keys else real([], **kw)

    inference.embed_files = embed

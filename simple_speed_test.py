"""Student inference speed on a run's test images, across backends and devices, measured in one run.

    uv run simple_speed_test.py                                   # ONNX Runtime (the CPU deploy path) vs torch eager
    uv run simple_speed_test.py --backend all --threads 2         # every backend
    uv run simple_speed_test.py --backend all --compare_devices   # every backend on every available device
    uv run simple_speed_test.py --other_student                   # the other student beside it (torch, ONNX Runtime)

Two figures per backend and device:
  model-only  images/s at --batch_size on images already decoded in memory;
  end to end  JPEG decode (threads) + preprocess + model, images/s at --batch_size, and p50/p95 latency
              per image at batch 1.
Every backend but "original" runs the exported graph's definition (flywheel.export.serving_graph): raw
uint8 pixels in, the resize, sharpening and normalisation inside, so its model-only figure includes the
preprocessing the original path does outside the model.
Warm-up runs come first; CUDA is synchronised around every timing. The speed-up column is against
torch eager on the same device, measured in the same run (torch eager always runs as the baseline).
--other_student also times the other architecture (MobileNetV3-Small or EfficientNet-Lite0) through the same
serving graph, at the same size, with random weights: speed does not depend on the weights, and its rows
say "student" and "speed only" so nothing reads them as the run's student.
Writes --json (default ROOT/artifacts/speed.json), which cost_breakeven.py and the report read.
"""
import argparse
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from flywheel import FlywheelError
from flywheel.io import write_json
from flywheel.run import Paths, Turn, heldout_rows, load_manifest, prep_sharpens, promoted_artifacts
from flywheel.export import load_images, ort_session
from flywheel.student import ARCH, STUDENTS, build_model, load_student, model_from_checkpoint

BACKENDS = ["original", "torch", "torch_channels_last", "torchscript", "onnxruntime"]
# "original": the original tool's serving path, the baseline every speed-up is quoted against: per image
# PIL decode + torchvision Resize/ToTensor/Normalize, one after another, then eager fp32 torch.
WARMUP_ITERS = 3
LATENCY_IMAGES = 50  # batch-1 latency samples
DEFAULT_REPEATS = 5  # each throughput figure is timed this many times; the median is quoted with min and max


def available_devices():
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs.append("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        devs.append("mps")
    return devs


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def make_runner(backend, device, P, best, threads, sharpen):
    """-> fn(input numpy) -> calibrated logits numpy [B,C]. The input is raw uint8 [B,H,W,3] for every
    backend but "original", which takes its own float32 [B,3,H,W] (see original_preprocess)."""
    if backend == "onnxruntime":
        if device != "cpu":
            import onnxruntime as ort
            if device != "cuda" or "CUDAExecutionProvider" not in ort.get_available_providers():
                return None  # this onnxruntime build has no provider for the device
        sess = ort_session(P.need(P.onnx, "export"), threads, device)
        return lambda x: sess.run(None, {"image": x})[0]
    dev = torch.device(device)
    if backend == "torchscript":
        m = torch.jit.load(str(P.need(P.ts, "export")), map_location=dev).eval()
    elif backend == "original":
        from flywheel.export import CalibratedStudent
        m = CalibratedStudent(model_from_checkpoint(best), best["temperature"]).eval().to(dev)
    else:
        from flywheel.export import serving_graph
        m = serving_graph(model_from_checkpoint(best), best["temperature"], best["model_args"]["img_size"], sharpen).to(dev)
        if backend == "torch_channels_last":
            m = m.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def run(x):
        return m(torch.from_numpy(x).to(dev, non_blocking=True)).float().cpu().numpy()
    return run


def other_student_runners(best, arch, device, threads, sharpen):
    """{backend: fn} for architecture `arch` with random weights, through the serving graph the run exports
    (same classes, size and sharpening): torch eager and, on CPU, ONNX Runtime."""
    import tempfile
    from flywheel.export import export_onnx, serving_graph
    size = best["model_args"]["img_size"]
    graph = serving_graph(build_model(len(best["classes"]), "none", arch), 1.0, size, sharpen)
    if device == "cpu":  # exported before the graph moves to another device
        path = Path(tempfile.mkdtemp(prefix="speed_")) / f"{arch}.onnx"
        export_onnx(graph, path, size, {"note": "speed only"})
    dev = torch.device(device)
    m = graph.to(dev)
    out = {"torch": torch.no_grad()(lambda x: m(torch.from_numpy(x).to(dev)).float().cpu().numpy())}
    if device == "cpu":
        sess = ort_session(path, threads, device)
        out["onnxruntime"] = lambda x: sess.run(None, {"image": x})[0]
    return out


def spread(xs):
    """Median, min and max of repeated measurements (one noisy run never stands alone).

    >>> spread([120.0, 14.0, 118.0, 121.0, 119.0])
    {'median': 119.0, 'min': 14.0, 'max': 121.0}
    """
    return {"median": float(np.median(xs)), "min": float(min(xs)), "max": float(max(xs))}


def original_preprocess(size):
    """-> fn(files, pool) -> float32 [B,3,H,W]: the original tool's PIL + torchvision transforms, per image,
    sequentially (pool unused), so the same numbers reach the model as in training (checked in the tests)."""
    from PIL import Image
    from torchvision import transforms as T
    from flywheel.student import IMAGENET_MEAN, IMAGENET_STD
    tf = T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def prep(files, pool=None):
        out = []
        for f in files:
            with Image.open(f) as im:
                out.append(tf(im.convert("RGB")))
        return torch.stack(out).numpy()
    return prep


class BackendTimer:
    """Timings of one backend on one device. Its repeats are interleaved with the other backends' (A B C,
    A B C, ...) by measure_all, so a machine that slows down mid-run slows every backend alike instead of
    whichever happened to run then."""

    def __init__(self, run, device, files, batch_size, pool, prep=load_images):
        self.run, self.device, self.files, self.pool, self.prep = run, device, files, pool, prep
        self.x = prep(files[:batch_size], pool)
        self.n_iters = max(1, len(files) // batch_size)
        self.batches = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
        self.model, self.e2e = [], []
        for _ in range(WARMUP_ITERS):
            run(self.x)

    def time_model_only(self):  # preprocessed batches already in memory
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(self.n_iters):
            self.run(self.x)
        sync(self.device)
        self.model.append(self.n_iters * len(self.x) / (time.perf_counter() - t0))

    def time_end_to_end(self):  # decode the next batch in threads while the model runs the current one
        sync(self.device)
        t0 = time.perf_counter()
        nxt = self.pool.submit(self.prep, self.batches[0], None)
        for i in range(len(self.batches)):
            xb = nxt.result()
            if i + 1 < len(self.batches):
                nxt = self.pool.submit(self.prep, self.batches[i + 1], None)
            self.run(xb)
        sync(self.device)
        self.e2e.append(len(self.files) / (time.perf_counter() - t0))

    def figures(self):
        lat = []
        for f in self.files[:LATENCY_IMAGES]:
            t0 = time.perf_counter()
            self.run(self.prep([f]))
            sync(self.device)
            lat.append((time.perf_counter() - t0) * 1000)
        m, e = spread(self.model), spread(self.e2e)
        return {"model_img_per_s": m["median"], "model_img_per_s_min": m["min"], "model_img_per_s_max": m["max"],
                "e2e_img_per_s": e["median"], "e2e_img_per_s_min": e["min"], "e2e_img_per_s_max": e["max"],
                "repeats": len(self.model), "p50_ms_b1": float(np.percentile(lat, 50)),
                "p95_ms_b1": float(np.percentile(lat, 95)), "n_images": len(self.files)}


def measure_all(timers, repeats=DEFAULT_REPEATS):
    """Interleave `repeats` rounds over the backends, then -> [figures] in the timers' order."""
    from tqdm import tqdm
    for _ in tqdm(range(repeats), desc="timing rounds", unit="round"):
        for t in timers:
            t.time_model_only()
        for t in timers:
            t.time_end_to_end()
    return [t.figures() for t in timers]


def machine_info():
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import onnxruntime
        ort_v = onnxruntime.__version__
    except ImportError:
        ort_v = None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "onnxruntime": ort_v,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="cifar5_run", metavar="DIR", help="run folder (default: cifar5_run)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"], help="device to measure (default: cpu)")
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS + ["all"],
                   help="backend to measure; torch eager always runs too, as the baseline (default: onnxruntime)")
    p.add_argument("--batch_size", type=int, default=32, metavar="N", help="batch size for throughput (default: 32)")
    p.add_argument("--max_images", type=int, default=256, metavar="N", help="test images to time (default: 256)")
    p.add_argument("--threads", type=int, default=0, metavar="N", help="CPU threads for torch and ORT, 0 = library default (default: 0)")
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, metavar="N",
                   help=f"timings per throughput figure after the warm-up; the median is quoted with min and max (default: {DEFAULT_REPEATS})")
    p.add_argument("--compare_devices", action="store_true", help="measure every available device (default: off)")
    p.add_argument("--other_student", action="store_true",
                   help="also time the other student architecture (random weights, speed only) on torch and ONNX "
                        "Runtime, side by side (default: off)")
    p.add_argument("--json", default=None, metavar="PATH", help="where to write the figures (default: speed.json in the promoted turn's artifacts folder)")
    return p


def main(argv=None):
    try:
        return run(build_parser().parse_args(argv))
    except FlywheelError as e:  # a problem the user fixes (a missing step, a run folder in use): its message
        raise SystemExit(f"error: {e}") from None


def run(a):
    if a.batch_size < 1 or a.max_images < 1 or a.threads < 0 or a.repeats < 1:
        raise SystemExit("error: --batch_size, --max_images and --repeats must be >= 1 and --threads >= 0")
    devices = available_devices() if a.compare_devices else [a.device]
    if a.device not in available_devices():
        raise SystemExit(f"error: --device {a.device} is not available here (available: {available_devices()})")
    if a.threads:
        torch.set_num_threads(a.threads)
    P = Paths(a.root)
    art, turn = promoted_artifacts(P.out)
    best = load_student(Turn(art).best)  # the student that ships
    files = [P.out / r["path"] for r in heldout_rows(load_manifest(P))][:a.max_images]
    if not files:
        raise SystemExit(f"error: no test images in {P.manifest}; rerun --step prep")
    # the original tool's path and torch eager always run too: the baselines of every speed-up
    backends = BACKENDS if a.backend == "all" else list(dict.fromkeys(["original", "torch", a.backend]))
    size = best["model_args"]["img_size"]
    sharpen = prep_sharpens(P, True)
    results = []
    with ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as pool:
        for dev in devices:
            timers, names = [], []
            for b in backends:
                run = make_runner(b, dev, P, best, a.threads, sharpen)
                if run is None:
                    print(f"skip {b} on {dev}: this onnxruntime build has no provider for it", file=sys.stderr)
                    continue
                prep = original_preprocess(size) if b == "original" else load_images
                timers.append(BackendTimer(run, dev, files, a.batch_size, pool, prep))
                names.append(b)
            arch = best["model_args"].get("arch", ARCH)
            names = [(arch, b) for b in names]
            if a.other_student:
                other = next(s for s in STUDENTS if s != arch)
                for b, fn in other_student_runners(best, other, dev, a.threads, sharpen).items():
                    timers.append(BackendTimer(fn, dev, files, a.batch_size, pool, load_images))
                    names.append((other, b))
            for (st, b), fig in zip(names, measure_all(timers, a.repeats)):
                results.append({"backend": b, "device": dev, "batch_size": a.batch_size, "student": st,
                                **({} if st == arch else {"speed_only": True}), **fig})
    base = {r["device"]: r for r in results if r["backend"] == "torch" and not r.get("speed_only")}
    orig = {r["device"]: r for r in results if r["backend"] == "original"}
    for r in results:
        r["speedup_vs_torch"] = r["model_img_per_s"] / base[r["device"]]["model_img_per_s"]
        r["e2e_speedup_vs_torch"] = r["e2e_img_per_s"] / base[r["device"]]["e2e_img_per_s"]
        r["speedup_vs_original"] = r["model_img_per_s"] / orig[r["device"]]["model_img_per_s"]
        r["e2e_speedup_vs_original"] = r["e2e_img_per_s"] / orig[r["device"]]["e2e_img_per_s"]
    info = machine_info()
    print(f"{info['cpu']} | {info['cores']} cores | torch {info['torch']} | onnxruntime {info['onnxruntime']} | "
          f"{size}px, batch {a.batch_size}, {len(files)} images; img/s: median [min-max] of {a.repeats} timings, "
          f"interleaved across backends")
    print(f"{'student':<20}{'backend':<20}{'device':<7}{'model img/s':>22}{'e2e img/s':>22}{'p50 ms b1':>11}{'p95 ms b1':>11}"
          f"{'vs original model / e2e':>26}")
    for r in results:
        mo = f"{r['model_img_per_s']:.1f} [{r['model_img_per_s_min']:.0f}-{r['model_img_per_s_max']:.0f}]"
        ee = f"{r['e2e_img_per_s']:.1f} [{r['e2e_img_per_s_min']:.0f}-{r['e2e_img_per_s_max']:.0f}]"
        print(f"{r['student'] + (' (speed only)' if r.get('speed_only') else ''):<20}{r['backend']:<20}{r['device']:<7}{mo:>22}{ee:>22}"
              f"{r['p50_ms_b1']:>11.2f}{r['p95_ms_b1']:>11.2f}"
              f"{r['speedup_vs_original']:>16.2f}x / {r['e2e_speedup_vs_original']:.2f}x")
    out = Path(a.json) if a.json else Turn(art).speed  # beside the student it timed: the report and breakeven look there
    write_json(out, {"machine": info, "img_size": size, "turn": turn, "results": results})
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()

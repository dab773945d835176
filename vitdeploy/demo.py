"""``vitdeploy demo``: the whole job on real data that ships with scikit-learn, no downloads.

A small timm ViT is trained for about a minute on the bundled handwritten digits (1,797 8×8
images), saved as a state_dict, built with ``--arch`` exactly as a user would, and compared:
FP32 vs INT8 top-1 on held-out digits, file size and ONNX Runtime CPU latency.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from .log import get_logger, progress

log = get_logger(__name__)

ARCH = "vit_tiny_patch16_224"
MODEL_KWARGS = {"img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 10, "embed_dim": 64,
                "depth": 4, "num_heads": 4, "mlp_ratio": 2.0}
TEST_IMAGES = 500
BATCH = 64
PEAK_LR = 1e-3
DEFAULT_EPOCHS = 100  # about a minute on 2 cores
SEED = 0


def digits_npz(folder: Path):
    """Split scikit-learn's digits into train/test .npz files of uint8 pixels (N×8×8) and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    order = np.random.default_rng(SEED).permutation(len(pixels))
    test, train = order[:TEST_IMAGES], order[TEST_IMAGES:]
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, idx in (("train", train), ("test", test)):
        paths[split] = folder / f"digits_{split}.npz"
        np.savez(paths[split], x=pixels[idx], y=digits.target[idx].astype(np.int64))
    mean = float(pixels[train].mean() / 255.0)
    std = float(pixels[train].std() / 255.0)
    return paths, mean, std


def train(train_npz: Path, mean: float, std: float, epochs: int = DEFAULT_EPOCHS):
    """AdamW, warm-up then cosine decay, fixed seed and epoch count: the same model on every machine."""
    import timm
    import torch

    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    data = np.load(train_npz)
    x = torch.from_numpy((data["x"][:, None].astype(np.float32) / 255.0 - mean) / std)
    y = torch.from_numpy(data["y"])
    model = timm.create_model(ARCH, pretrained=False, **MODEL_KWARGS)
    opt = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, weight_decay=0.05)
    steps_per_epoch = (len(x) + BATCH - 1) // BATCH
    total, step, start = epochs * steps_per_epoch, 0, time.perf_counter()
    model.train()
    for _ in progress(range(epochs), "train", total=epochs, unit="epoch"):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), BATCH):
            done = step / total
            for group in opt.param_groups:
                group["lr"] = PEAK_LR * min(1.0, done / 0.05) * 0.5 * (1 + math.cos(math.pi * done))
            idx = perm[i:i + BATCH]
            # Random shifts by one pixel: the digits set is tiny and a ViT overfits it fast.
            xb = torch.roll(x[idx], shifts=tuple(int(s) for s in rng.integers(-1, 2, size=2)), dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(model(xb), y[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    log.info("trained %d epochs in %.0f s (last loss %.3f)", epochs, time.perf_counter() - start, loss.item())
    return model.eval()


def run_demo(out: Path = Path("engines"), epochs: int = DEFAULT_EPOCHS) -> str:
    """Train, build, measure; returns the table printed by the CLI."""
    import torch

    from .backends.ort import OrtRunner
    from .measure.core import latency_stats, random_feed, time_runner
    from .pipeline import BuildConfig, build
    from .report import table

    out = Path(out)
    sources = out / "demo-inputs"
    paths, mean, std = digits_npz(sources)
    model = train(paths["train"], mean, std, epochs)
    checkpoint = sources / "digits_vit.pt"
    torch.save(model.state_dict(), checkpoint)
    record = build(BuildConfig(
        model=checkpoint, arch=ARCH, model_kwargs=json.dumps(MODEL_KWARGS), calib=paths["train"],
        mean=(mean,), std=(std,), eval_data=paths["test"], out=out / "digits_vit", name="digits_vit"))
    folder = Path(record["output"])
    rows, base = [], None
    for tag, label in (("fp32", "FP32"), ("int8", "INT8")):
        with OrtRunner(folder / f"model.{tag}.onnx", threads=1) as runner:
            lat = latency_stats(time_runner(runner, random_feed(runner, 1), warmup=20, runs=200))
        size = record["files"][f"model.{tag}.onnx"]
        base = base or (size, lat["median"])
        rows.append([label, record["accuracy"][f"{tag}_top1"], size / 1e6, lat["median"], lat["p99"],
                     f"{base[1] / lat['median']:.2f}x", f"{base[0] / size:.2f}x"])
    acc = record["accuracy"]
    return "\n".join([
        f"vitdeploy demo: timm ViT ({sum(p.numel() for p in model.parameters()) / 1e3:.0f}k parameters) trained on "
        f"scikit-learn digits, built into {folder}/",
        "",
        table([f"precision", f"top-1 % ({acc['images']} test digits)", "size (MB)", "latency median (ms)",
               "p99 (ms)", "speed-up", "size ratio"], rows),
        "",
        f"INT8 agrees with FP32 on {acc['agreement']:.2f} % of the test digits. Latency: ONNX Runtime, CPU, batch 1, "
        "1 thread, 200 runs.",
        f"Next: vitdeploy eval {folder}/model.int8.onnx --data {paths['test']} --json",
    ])

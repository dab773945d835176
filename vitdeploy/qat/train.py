"""Quantization-aware training of a calibrated fake-quant model (Q-ViT: LSQ + IRM + DGD), on one CPU or
GPU, or on many through PyTorch's own distributed data parallel (``torchrun ... -m vitdeploy qat``).

What is learned: every weight (a latent FP32 weight, quantized in the forward pass), bias, norm and
embedding; each quantizer's step (lsq.py); with ``irm`` the rectification of q and k (irm.py). The
loss is the FP32 teacher's: KL of the logits at a temperature, with ``dgd`` the q/k similarity
match (distill.py), and cross-entropy where the images have labels. Afterwards everything folds
back into the ordinary calibrated model (steps into amax, rectification into the qkv rows), which
exports, lints and verifies as every build does.

Determinism: the image order of epoch e is a permutation drawn from ``seed`` and e alone, and a
checkpoint (written atomically after every epoch, by rank 0) holds the model, the optimizer and the
schedule -- so a run resumed from epoch e's checkpoint continues exactly as the uninterrupted run.
Distributed: each global batch of ``batch`` images is split evenly over the ranks, and DDP's mean
of the gradients is the gradient of the global batch's mean loss, the one-process run's.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ..errors import InputError
from ..log import get_logger, progress_bar
from ..quantize.low_bit import mse_clip_below_8_bits
from .distill import QkTaps, dgd_loss, kd_loss, tapped_teacher
from .irm import fold_irm, install_irm
from .lsq import LsqQuantizer, fold_lsq, install_lsq

log = get_logger(__name__)

CHECKPOINT = "last.pt"
CHECKPOINT_VERSION = 1


def parse_bits(text: str):
    """"W4A4" → (4, 4); weights and activations 2 to 8 bits."""
    import re

    m = re.fullmatch(r"[wW](\d)[aA](\d)", text.strip())
    if not m or not all(2 <= int(b) <= 8 for b in m.groups()):
        raise InputError(f"--bits: expected W<2-8>A<2-8> such as W4A4 or W8A8, got {text!r}")
    return int(m.group(1)), int(m.group(2))


@dataclasses.dataclass(frozen=True)
class QatSettings:
    weight_bits: int = 8
    activation_bits: int = 8
    epochs: int = 3
    batch: int = 32                 # the global batch (split over the ranks)
    lr: float = 1e-4                # AdamW, weights and every other model parameter
    # Steps and rectification: relative rates (a step's rate is this times its initial size), so one
    # value fits a softmax step of 0.008 and an fc2-input step of 1.7 alike.
    step_lr: float = 1e-2
    warmup: float = 0.05            # share of the steps with a linear warm-up, then cosine to 0
    irm: bool = True
    dgd: bool = True
    dgd_weight: float = 1.0
    kd_weight: float = 1.0
    temperature: float = 1.0
    ce_weight: float = 1.0          # with labels only
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"               # bf16 autocast on CUDA (the quantizers stay FP32), none on CPU

    @property
    def bits(self) -> str:
        return f"W{self.weight_bits}A{self.activation_bits}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


def distributed() -> tuple:
    """(rank, world size) of the process group torchrun (or a test) set up; (0, 1) without one.
    Under torchrun (WORLD_SIZE > 1 in the environment) the group is started here: NCCL on GPUs, gloo on CPUs."""
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def prepare(qmodel: nn.Module, images: torch.Tensor, settings: QatSettings) -> dict:
    """Sub-8-bit MSE start, rectifiers and LSQ quantizers installed in ``qmodel`` (in place, deterministic
    from the calibrated model and ``images``, so a resumed run rebuilds the same structure)."""
    probe = images[:64]
    mse = mse_clip_below_8_bits(qmodel, probe) if min(settings.weight_bits, settings.activation_bits) < 8 else 0
    rectified = install_irm(qmodel, probe) if settings.irm else []
    lsq = install_lsq(qmodel)
    return {"mse_initialised": mse, "rectified": rectified, "lsq_quantizers": len(lsq)}


def train_qat(teacher: nn.Module, qmodel: nn.Module, images: torch.Tensor, labels: Optional[torch.Tensor],
              settings: QatSettings, checkpoint_dir: Optional[Path] = None, resume: bool = False,
              on_epoch_end: Optional[Callable[[int], None]] = None) -> dict:
    """Train ``qmodel`` (calibrated, from `quantize_with_techniques`) towards ``teacher`` (its FP32 model)
    in place, then fold everything back into it. Returns the build.json "qat" object."""
    started = time.perf_counter()
    rank, world = distributed()
    if settings.batch % world:
        raise InputError(f"--batch-size {settings.batch} must be a multiple of the {world} processes")
    if settings.batch > len(images):
        raise InputError(f"--batch-size {settings.batch} is larger than the {len(images)} training images")
    device = resolve_device(settings.device)
    torch.manual_seed(settings.seed)
    qmodel.eval()   # no dropout or drop-path: the quantizers train, not the regularisers
    record = prepare(qmodel, images, settings)
    qmodel.to(device)
    paths = [p for p, m in qmodel.named_modules() if isinstance(getattr(m, "q_quantizer", None), nn.Module)
             and getattr(m.q_quantizer, "enabled", False)] if settings.dgd else []
    teacher = tapped_teacher(teacher, paths).to(device)
    student_taps, teacher_taps = QkTaps(qmodel, paths), QkTaps(teacher, paths)
    for p in qmodel.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(_param_groups(qmodel, settings), weight_decay=0.0)
    per_epoch = len(images) // settings.batch   # whole global batches: every rank gets an equal share
    total = settings.epochs * per_epoch
    warm = max(1, int(settings.warmup * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: (t + 1) / warm if t < warm else 0.5 * (1 + math.cos(math.pi * (t - warm) / max(1, total - warm))))
    fingerprint = _fingerprint(settings, images, qmodel)
    history: List[Dict[str, float]] = []
    first_epoch = 0
    if resume:
        first_epoch, history = _load_checkpoint(checkpoint_dir, fingerprint, qmodel, optimizer, schedule, device)
    model = qmodel
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # Without a logit loss (DGD alone) the head gets no gradient: DDP must be told, or it waits for it.
        logits_used = settings.kd_weight > 0 or (labels is not None and settings.ce_weight > 0)
        model = DistributedDataParallel(qmodel, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=not logits_used)
    amp = settings.amp == "bf16" or (settings.amp == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else _no_autocast
    labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
    share = settings.batch // world
    bar = progress_bar(total, "qat", unit="step", initial=first_epoch * per_epoch, enabled=rank == 0)
    try:
        for epoch in range(first_epoch, settings.epochs):
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(settings.seed * 100003 + epoch))
            sums: Dict[str, float] = {}
            for step in range(per_epoch):
                pick = order[step * settings.batch:(step + 1) * settings.batch][rank * share:(rank + 1) * share]
                x = images[pick].to(device)
                with autocast():
                    with torch.no_grad():
                        t_logits = teacher(x)
                    t_qk = teacher_taps.take()
                    s_logits = model(x)
                    s_qk = student_taps.take()
                    parts = {"kd": settings.kd_weight * kd_loss(s_logits, t_logits, settings.temperature)}
                    if settings.dgd and paths:
                        parts["dgd"] = settings.dgd_weight * dgd_loss(s_qk, t_qk)
                    if labels is not None and settings.ce_weight > 0:
                        parts["ce"] = settings.ce_weight * nn.functional.cross_entropy(
                            s_logits.float(), labels[pick].to(device))
                    loss = sum(parts.values())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.4f}")
            history.append({k: round(v / per_epoch, 6) for k, v in sums.items()})
            if checkpoint_dir is not None:
                _save_checkpoint(checkpoint_dir, fingerprint, epoch + 1, qmodel, optimizer, schedule, history, rank)
            log.info("qat epoch %d/%d: %s", epoch + 1, settings.epochs,
                     ", ".join(f"{k} {v:.4f}" for k, v in history[-1].items()))
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1)
    finally:
        bar.close()
        student_taps.remove()
        teacher_taps.remove()
    for p in qmodel.parameters():
        p.requires_grad_(False)
    record["folded"] = {**fold_lsq(qmodel), "rectified": fold_irm(qmodel)}
    qmodel.to("cpu")
    record.update({"settings": settings.to_dict(), "device": str(device), "processes": world,
                   "images": len(images), "labels": labels is not None, "steps_per_epoch": per_epoch,
                   "resumed_from_epoch": first_epoch if resume else None, "history": history,
                   "losses": sorted({k for h in history for k in h}),
                   "seconds": round(time.perf_counter() - started, 1)})
    return record


class _no_autocast:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _param_groups(qmodel: nn.Module, settings: QatSettings) -> list:
    """Model parameters at ``lr``; each LSQ step at ``step_lr`` times its initial size; rectifiers at ``step_lr``."""
    lsq = [m for m in qmodel.modules() if isinstance(m, LsqQuantizer)]
    steps = {id(m.step) for m in lsq}
    rect = [p for n, p in qmodel.named_parameters() if n.endswith((".rho", ".b")) and id(p) not in steps]
    special = steps | {id(p) for p in rect}
    groups = [{"params": [p for p in qmodel.parameters() if id(p) not in special], "lr": settings.lr}]
    groups += [{"params": [m.step], "lr": settings.step_lr * float(m.step.detach().abs().mean())} for m in lsq]
    if rect:
        groups.append({"params": rect, "lr": settings.step_lr})
    return groups


def _fingerprint(settings: QatSettings, images: torch.Tensor, qmodel: nn.Module) -> dict:
    """What a checkpoint must agree on to be resumed: the settings that shape the run, and the data."""
    keep = {k: v for k, v in settings.to_dict().items() if k not in ("device", "amp")}
    return {"settings": keep, "images": len(images), "image_sum": round(float(images[:256].double().sum()), 3),
            "parameters": sum(p.numel() for p in qmodel.parameters())}


def _save_checkpoint(folder: Path, fingerprint: dict, epoch: int, qmodel, optimizer, schedule, history, rank) -> None:
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (CHECKPOINT + ".tmp")
        torch.save({"version": CHECKPOINT_VERSION, "fingerprint": fingerprint, "epoch": epoch,
                    "model": qmodel.state_dict(), "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(), "history": history}, tmp)
        os.replace(tmp, folder / CHECKPOINT)   # a kill mid-write leaves the previous checkpoint whole
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _load_checkpoint(folder: Optional[Path], fingerprint: dict, qmodel, optimizer, schedule, device):
    path = None if folder is None else Path(folder) / CHECKPOINT
    if path is None or not path.is_file():
        raise InputError(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise InputError(f"--resume: cannot read {path}: {exc}") from exc
    if state.get("version") != CHECKPOINT_VERSION or state.get("fingerprint") != fingerprint:
        theirs = state.get("fingerprint", {}).get("settings", {})
        diff = [k for k in fingerprint["settings"] if theirs.get(k) != fingerprint["settings"][k]]
        what = f"settings differ: {', '.join(diff)}" if diff else "the data or the model differ"
        raise InputError(f"--resume: {path} belongs to another run ({what}); remove it or rerun with the same options")
    qmodel.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    log.info("resuming from %s after epoch %d", path, state["epoch"])
    return int(state["epoch"]), list(state["history"])

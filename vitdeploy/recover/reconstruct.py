"""Block reconstruction: each unit's quantized output brought back to its FP32 output, stage by stage.

For every unit (units.py) in model order, with its input taken from the already-quantized (and
already-recovered) units before it, minimise ``‖unit_q(x_q) - unit_fp(x_fp)‖² / ‖unit_fp(x_fp)‖²``
over the calibration images by AdamW on what learnable.py exposes: the rounding of every weight
(AdaRound, with its regulariser pushing each rounding to a definite 0 or 1), the activation steps
(LSQ), the biases and, with ``lowrank``, a rank-r term added to each weight. Before the gradient
steps, ``softmax`` picks each attention's post-softmax interval (softmax_focus.py); with
``curriculum`` the images are ordered by their loss at the start, easy first, and the share drawn
from grows linearly from half of them to all. A unit whose learned state does worse than where it
started (measured on held-back images, with hard rounding) is put back.

``progressive`` (the thesis's schedule) turns the quantizers on in stages -- MLP, attention output,
QKV with the attention matmuls, then patch embedding and head -- and reconstructs after each, so
later stages adapt to earlier ones; without it there is one stage with every quantizer on.
Below 8 bits each unit first tries, quantizer by quantizer, the MSE clip of its calibrated range
(quantize/low_bit.py) and keeps it where the unit's loss falls: a learned step moves by about e^±1
in 100 steps, and a 4-bit step over a max range (217 for ViT-Tiny's massive fc2 input) must shrink
10-30 times -- yet the clip that is best for the tensor can be worse for the block (the massive
token it clips is what the block carries), so the unit's loss decides, not the tensor's error.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..log import get_logger, progress
from ..quantize.apply import quantized_attentions, quantized_layers
from ..quantize.low_bit import mse_clips
from .learnable import LearnedStep, LearnedWeight, learnable_activation
from .softmax_focus import focus_softmax
from .units import find_units, mark_chains, record, record_reference

log = get_logger(__name__)

#: The thesis's progressive order, by layer role (inventory.py). Layers of no known role come last.
STAGES = (("mlp", ("mlp_fc1", "mlp_fc2")), ("attention-out", ("attn_out",)),
          ("qkv", ("qkv", "attn_qk", "attn_av")), ("patch-embed + head", ("patch_embed", "head", "linear")))
RANKS = (0, 4, 8, 16, 32)


@dataclasses.dataclass(frozen=True)
class RecoverySettings:
    progressive: bool = True
    lowrank: bool = True
    softmax: bool = True
    curriculum: bool = True
    # 100 steps per block and stage: ViT-Tiny's default plan (3 stages x 12 blocks) then recovers in
    # about 10 minutes on 2 cores, inside the 15 a build may take.
    iters: int = 100            # gradient steps per unit and stage
    batch: int = 32
    # Activation log-steps (biases at a tenth of it). ViT-Tiny, one stage, 100 steps: KL to FP32
    # 0.0107 calibrated, 0.0103 with 1e-3, 0.0097 with 1e-2.
    lr: float = 1e-2
    rounding_lr: float = 1e-2
    rounding_weight: float = 0.01
    ranks: Sequence[int] = RANKS
    guard_images: int = 64
    seed: int = 0
    device: str = "auto"
    # The thesis's full-model recipe after the stages, when the calibration images have labels:
    # cross-entropy, AdamW, linear warm-up over the first tenth of the steps, every parameter.
    epochs: int = 0
    finetune_lr: float = 2e-5

    def switches(self) -> dict:
        return {"progressive": self.progressive, "lowrank": self.lowrank, "softmax": self.softmax,
                "curriculum": self.curriculum}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ranks"] = list(self.ranks)
        return d


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class _Learnables:
    """Every learnable quantizer installed in the model, by layer name, and how to fold them back."""

    def __init__(self, qmodel: nn.Module, names: Sequence[str], rank: int, generator: torch.Generator):
        self.weights: Dict[str, LearnedWeight] = {}
        self.steps: Dict[str, List[LearnedStep]] = {}
        self.switches: Dict[str, List] = {}     # layer → every quantizer-like object its stage turns on
        self.clips: Dict[nn.Module, torch.Tensor] = {}   # below 8 bits: clipped values still to try
        layers, attentions = quantized_layers(qmodel), quantized_attentions(qmodel)
        for name in names:
            if name in layers:
                m = layers[name]
                lw = LearnedWeight(m.weight_quantizer, m.weight, rank if isinstance(m, nn.Linear) else 0, generator)
                m.weight_quantizer = lw
                self.weights[name] = lw
                self.switches[name] = [lw, self._step(m, "input_quantizer", name)]
            else:
                path, _, matmul = name.rpartition(".")
                m = attentions[path]
                attrs = ("q_quantizer", "k_quantizer") if matmul == "matmul_qk" else ("v_quantizer", "softmax_quantizer")
                self.switches[name] = [self._step(m, a, name) if a != "softmax_quantizer" else m.softmax_quantizer
                                       for a in attrs]
        self.modules = {**layers, **attentions}

    def _step(self, module: nn.Module, attr: str, name: str):
        q = getattr(module, attr)
        if not learnable_activation(q):
            return q
        step = LearnedStep(q)
        setattr(module, attr, step)
        self.steps.setdefault(name, []).append(step)
        return step

    def offer_clips(self, clips: Dict[int, torch.Tensor]) -> None:
        """{learned quantizer: the clipped value to try} from {id(original quantizer): clipped amax}:
        a weight's per-channel scale, a step's log-scale."""
        self.clips = {}
        for name, lw in self.weights.items():
            if id(lw.original) in clips:
                self.clips[lw] = clips[id(lw.original)] / lw.qmax
        for steps in self.steps.values():
            for step in steps:
                if id(step.original) in clips:
                    self.clips[step] = torch.log(clips[id(step.original)] / step.qmax)

    def enable(self, names) -> None:
        on = set(names)
        for name, objs in self.switches.items():
            for o in objs:
                o.enabled = name in on

    def set_hard(self, hard: bool) -> None:
        for lw in self.weights.values():
            lw.hard = hard

    def fold(self, qmodel: nn.Module) -> None:
        """Learned values into ordinary weights and scales; the original quantizers back in place."""
        for name, m in quantized_layers_with_learned(qmodel).items():
            lw = m.weight_quantizer
            with torch.no_grad():
                m.weight.data = lw.folded(m.weight).to(m.weight.dtype)
            if lw.rescaled:   # the clipped grid the weight now lies on
                lw.original.set_amax((lw.scale * lw.qmax).reshape(lw.original.amax.shape).cpu())
            m.weight_quantizer = lw.original
            m.weight_quantizer.enabled = True
        for module in self.modules.values():
            for attr in ("input_quantizer", "q_quantizer", "k_quantizer", "v_quantizer"):
                step = getattr(module, attr, None)
                if isinstance(step, LearnedStep):
                    step.original.set_amax(step.scale.detach().cpu() * step.qmax)
                    step.original.enabled = True
                    setattr(module, attr, step.original)
            if getattr(module, "softmax_quantizer", None) is not None:
                module.softmax_quantizer.enabled = True
            # A shifted input's z stays where it was (on the grid of the calibrated step, not of the
            # learned one): moving it onto the new grid moves every value of a near-constant channel
            # by the same fraction of a step, an error the learning never saw (ViT-Tiny: KL to FP32
            # 0.0097 before such a fold, 0.0114 after). Zero points stay 0 either way.


def quantized_layers_with_learned(qmodel: nn.Module) -> Dict[str, nn.Module]:
    return {n: m for n, m in qmodel.named_modules() if isinstance(getattr(m, "weight_quantizer", None), LearnedWeight)}


def recover(fp32: nn.Module, qmodel: nn.Module, layers: Sequence, quantized: Sequence[str], images: torch.Tensor,
            settings: RecoverySettings = RecoverySettings(),
            after_stage: Optional[Callable[[nn.Module], dict]] = None, labels: Optional[torch.Tensor] = None) -> dict:
    """Reconstruct ``qmodel`` (calibrated, from `quantize_with_techniques`) towards ``fp32`` in place.

    ``layers``: the inventory (names and roles); ``quantized``: the names the plan quantizes;
    ``after_stage(qmodel)`` may measure the model after each stage (its dict goes into the record);
    ``labels`` (one per image) are needed by ``settings.epochs``.
    Returns the build.json "recovery" object.
    """
    started = time.perf_counter()
    device = resolve_device(settings.device)
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    roles = {layer.name: layer.role for layer in layers}
    clips = mse_clips(qmodel.eval(), images[:64])   # below 8 bits only: {} at INT8
    fp32, qmodel = fp32.eval().to(device), qmodel.eval().to(device)
    # Attentions by structure, quantized or not: a unit holds at most one (a block), whatever the plan.
    attention_paths = sorted({layer.name.rpartition(".")[0] for layer in layers
                              if layer.role in ("attn_qk", "qkv")})
    units = find_units(fp32, list(quantized), images[:1].to(device), attention_paths)
    learn = _Learnables(qmodel, quantized, max(settings.ranks) if settings.lowrank else 0, gen)
    learn.offer_clips(clips)
    learn.set_hard(True)
    for p in qmodel.parameters():
        p.requires_grad_(False)
    fp = record_reference(fp32, units, images, settings.batch)
    mark_chains(units, fp)
    stages = _stages(quantized, roles, settings.progressive)
    last_stage = {u.name: max(i for i, (_, names) in enumerate(stages) if set(names) & set(u.layers)) for u in units}
    result = {"settings": settings.to_dict(), "device": str(device), "images": len(images),
              "units": [u.name for u in units], "stages": [], "clip_candidates": len(learn.clips)}
    active: List[str] = []
    total = sum(1 for _, names in stages for u in units if set(names) & set(u.layers))
    bar = progress(range(total), "recover", total=total)
    steps = iter(bar)   # a generator: next() advances the bar, close() ends it
    for index, (stage_name, names) in enumerate(stages):
        stage_start = time.perf_counter()
        active += names
        learn.enable(active)
        unit_records = []
        # recorded: the quantized model's inputs of the units still ahead, valid until a unit changes
        prev_out, recorded, changed = None, None, True
        for i, unit in enumerate(units):
            if unit.chains and prev_out is not None:
                x = prev_out
            else:
                if changed or unit.name not in recorded:
                    recorded, changed = record(qmodel, units[i:], images, settings.batch, outputs=False), False
                x = recorded.pop(unit.name)["input"]
            module = qmodel.get_submodule(unit.name)
            learned_here = [n for n in unit.layers if n in active]
            if set(names) & set(unit.layers):
                unit_records.append({"unit": unit.name, **_reconstruct(
                    module, x, fp[unit.name], learned_here, learn, settings, gen, device,
                    choose_ranks=settings.lowrank and index == last_stage[unit.name])})
                changed = True
                next(steps, None)
            prev_out = _run(module, x, settings.batch, device) if i + 1 < len(units) and units[i + 1].chains else None
        stage_record = {"stage": stage_name, "layers": list(names), "units": unit_records,
                        "seconds": round(time.perf_counter() - stage_start, 1)}
        if after_stage is not None:
            stage_record["measured"] = after_stage(qmodel)
            log.info("recovery after stage %s: %s", stage_name, stage_record["measured"])
        result["stages"].append(stage_record)
    steps.close()
    if settings.epochs > 0:
        if labels is None:
            raise ValueError("the full-model fine-tuning (epochs) needs labelled calibration images")
        stage_start = time.perf_counter()
        losses = _fine_tune(qmodel, learn, images, labels, settings, gen, device)
        stage_record = {"stage": "fine-tune", "epochs": settings.epochs, "loss": losses,
                        "seconds": round(time.perf_counter() - stage_start, 1)}
        if after_stage is not None:
            stage_record["measured"] = after_stage(qmodel)
        result["stages"].append(stage_record)
    learn.fold(qmodel)
    for p in qmodel.parameters():
        p.requires_grad_(False)
    fp32.to("cpu")
    qmodel.to("cpu")
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def _fine_tune(qmodel: nn.Module, learn: _Learnables, images, labels, settings: RecoverySettings, gen,
               device) -> List[float]:
    """Every parameter, by cross-entropy on the labels; the rounding decisions stay fixed (hard), the
    weights move through the straight-through floor. Returns the mean loss of each epoch."""
    learn.set_hard(True)
    # Biases only of the quantized layers; every other bias stays as it is: the exporter shares equal
    # initializers through Identity nodes, so learning them apart would change the node count.
    own_bias = {f"{name}.bias" for name in learn.weights}
    params = [p for name, p in qmodel.named_parameters()
              if not name.endswith((".v", ".a", ".b", ".log_scale")) and (not name.endswith(".bias") or name in own_bias)]
    for p in params:
        p.requires_grad_(True)
    per_epoch = max(1, math.ceil(len(images) / settings.batch))
    warmup = max(1, int(0.1 * settings.epochs * per_epoch))
    optimizer = torch.optim.AdamW(params, lr=settings.finetune_lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: min(1.0, (t + 1) / warmup))
    history = []
    labels = torch.as_tensor(labels, dtype=torch.long)
    with torch.enable_grad():
        for _ in progress(range(settings.epochs), "fine-tune", total=settings.epochs, unit="epoch"):
            order, running = torch.randperm(len(images), generator=gen), 0.0
            for i in range(0, len(images), settings.batch):
                pick = order[i:i + settings.batch]
                loss = nn.functional.cross_entropy(qmodel(images[pick].to(device)), labels[pick].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                running += float(loss.detach()) * len(pick)
            history.append(round(running / len(images), 5))
    for p in params:
        p.requires_grad_(False)
    return history


def _stages(quantized: Sequence[str], roles: Dict[str, str], progressive: bool):
    if not progressive:
        return [("all", list(quantized))]
    out = []
    for name, stage_roles in STAGES:
        members = [n for n in quantized if roles.get(n, "linear") in stage_roles]
        if members:
            out.append((name, members))
    placed = {n for _, members in out for n in members}
    rest = [n for n in quantized if n not in placed]
    if rest:
        out.append(("other", rest))
    return out


@torch.no_grad()
def _run(module: nn.Module, x: torch.Tensor, batch: int, device) -> torch.Tensor:
    return torch.cat([module(x[i:i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)])


def _error(pred: torch.Tensor, target: torch.Tensor, importance: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Per image: Σ f·(out - y)², f the output's importance (units.record_reference), over the unit's
    mean Σ f·y² -- relative, so one set of learning rates serves every model and unit."""
    return (importance * (pred - target).pow(2)).flatten(1).sum(1) / norm


@torch.no_grad()
def _losses(module, x, ref, norm, batch, device, index=None) -> torch.Tensor:
    index = torch.arange(len(x)) if index is None else index
    out = []
    for i in range(0, len(index), batch):
        pick = index[i:i + batch]
        pred = module(x[pick].to(device)).float()
        out.append(_error(pred, ref["output"][pick].to(device), ref["importance"][pick].to(device), norm).cpu())
    return torch.cat(out)


def _reconstruct(module: nn.Module, x: torch.Tensor, ref: Dict[str, torch.Tensor], names: Sequence[str], learn: _Learnables,
                 settings: RecoverySettings, gen: torch.Generator, device, choose_ranks: bool) -> dict:
    weights = [learn.weights[n] for n in names if n in learn.weights]
    steps = [s for n in names for s in learn.steps.get(n, [])]
    layer_modules = [learn.modules[n] for n in names if n in learn.weights]
    biases = [m.bias for m in layer_modules if m.bias is not None]
    attentions = [learn.modules[n.rpartition(".")[0]] for n in names if n.endswith(".matmul_av")]
    n = len(x)
    guard = torch.randperm(n, generator=gen)[:min(settings.guard_images, n)]
    norm = (ref["importance"] * ref["output"].pow(2)).flatten(1).sum(1).mean().clamp_min(1e-30).to(device)

    def guard_loss() -> float:
        learn.set_hard(True)
        return float(_losses(module, x, ref, norm, settings.batch, device, guard).mean())

    snapshot = _snapshot(weights, steps, biases, attentions)
    before = guard_loss()
    out: dict = {"loss_before": before}
    offered = [q for q in weights + steps if q in learn.clips]
    if offered:
        out["clipped"] = _try_clips(offered, learn, names, guard_loss, before)
    if settings.softmax and attentions:
        out["softmax"] = focus_softmax(attentions, guard_loss)
    order = torch.arange(n)
    if settings.curriculum:
        learn.set_hard(True)
        order = torch.argsort(_losses(module, x, ref, norm, settings.batch, device), stable=True)
    params = [p for w in weights for p in (w.v, w.a, w.b) if p is not None] + [s.log_scale for s in steps] + biases
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(_param_groups(weights, steps, biases, settings), weight_decay=0.0)
    warmup = int(0.2 * settings.iters)
    learn.set_hard(False)
    module.train(False)
    numel = max(1, sum(w.v.numel() for w in weights))
    with torch.enable_grad():
        for t in range(settings.iters):
            share = 0.5 + 0.5 * t / max(1, settings.iters - 1) if settings.curriculum else 1.0
            pool = order[:max(settings.batch, int(math.ceil(share * n)))]
            pick = pool[torch.randint(len(pool), (min(settings.batch, len(pool)),), generator=gen)]
            pred = module(x[pick].to(device))
            rec = _error(pred, ref["output"][pick].to(device), ref["importance"][pick].to(device), norm).mean()
            loss = rec
            if t >= warmup and weights:
                beta = 20 - (20 - 2) * (t - warmup) / max(1, settings.iters - warmup)
                loss = loss + settings.rounding_weight * sum(w.regularizer(beta) for w in weights) / numel
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    for p in params:
        p.requires_grad_(False)
    if choose_ranks:
        out["ranks"] = _choose_ranks(names, learn, settings.ranks, guard_loss)
    after = guard_loss()
    out["loss_after"] = after
    out["kept"] = after < before
    if not out["kept"]:
        _restore(snapshot, weights, steps, biases, attentions)
        out["ranks"] = {k: 0 for k in out.get("ranks", {})}
    else:
        for m in layer_modules:
            m.bias_learned = True
    return out


@torch.no_grad()
def _try_clips(offered, learn: _Learnables, names, guard_loss, loss: float) -> int:
    """Each offered quantizer's MSE clip, one at a time, kept where the unit's loss falls; each is
    offered once (a later stage keeps what this one decided). Returns how many were kept."""
    weight_of = {learn.weights[n]: learn.modules[n].weight for n in names if n in learn.weights}
    kept = 0
    for q in offered:
        value = learn.clips.pop(q)
        if isinstance(q, LearnedWeight):
            old = (q.scale.clone(), q.v.detach().clone(), q.rescaled)
            q.use_scale(value, weight_of[q])
        else:
            old = q.log_scale.detach().clone()
            q.log_scale.copy_(value.to(q.log_scale))
        trial = guard_loss()
        if trial < loss:
            loss, kept = trial, kept + 1
        elif isinstance(q, LearnedWeight):
            q.scale.copy_(old[0])
            q.v.copy_(old[1])
            q.rescaled = old[2]
        else:
            q.log_scale.copy_(old)
    return kept


def _param_groups(weights, steps, biases, settings: RecoverySettings):
    groups = [{"params": [w.v for w in weights], "lr": settings.rounding_lr}]
    lowrank = [p for w in weights for p in (w.a, w.b) if p is not None]
    if lowrank:
        groups.append({"params": lowrank, "lr": settings.rounding_lr})   # B·A is in quantization steps too
    if steps:
        groups.append({"params": [s.log_scale for s in steps], "lr": settings.lr})
    if biases:
        groups.append({"params": biases, "lr": settings.lr * 0.1})
    return [g for g in groups if g["params"]]


def _choose_ranks(names, learn: _Learnables, candidates, guard_loss) -> Dict[str, int]:
    """Per Linear, the candidate rank of its trained B·A (truncated by SVD) with the least unit loss."""
    chosen = {}
    for name in names:
        lw = learn.weights.get(name)
        if lw is None or lw.rank == 0:
            continue
        with torch.no_grad():
            u, s, vh = torch.linalg.svd(lw.b @ lw.a, full_matrices=False)
            full_b, full_a = lw.b.detach().clone(), lw.a.detach().clone()
            trials = []
            for r in sorted(c for c in candidates if c <= lw.rank):
                if r == 0:
                    lw.b.zero_()
                else:
                    lw.b.zero_()
                    lw.a.zero_()
                    lw.b[:, :r] = u[:, :r] * s[:r]
                    lw.a[:r] = vh[:r]
                trials.append((guard_loss(), r))
            best = min(trials)[1]
            if best == lw.rank:
                lw.b.copy_(full_b)
                lw.a.copy_(full_a)
            else:
                lw.b.zero_()
                lw.a.zero_()
                if best:
                    lw.b[:, :best] = u[:, :best] * s[:best]
                    lw.a[:best] = vh[:best]
        chosen[name] = best
    return chosen


def _snapshot(weights, steps, biases, attentions):
    return ([(w.v.detach().clone(), None if w.a is None else w.a.detach().clone(),
              None if w.b is None else w.b.detach().clone(), w.scale.clone(), w.rescaled) for w in weights],
            [s.log_scale.detach().clone() for s in steps], [b.detach().clone() for b in biases],
            [_softmax_state(a) for a in attentions])


def _softmax_state(module):
    q = module.softmax_quantizer
    return (None if q.amax is None else q.amax.clone(), None if q.range_min is None else q.range_min.clone(),
            None if q.range_max is None else q.range_max.clone(),
            None if module.softmax_shift is None else module.softmax_shift.clone())


@torch.no_grad()
def _restore(snapshot, weights, steps, biases, attentions) -> None:
    w_state, s_state, b_state, a_state = snapshot
    for w, (v, a, b, scale, rescaled) in zip(weights, w_state):
        w.v.copy_(v)
        w.scale.copy_(scale)
        w.rescaled = rescaled
        if a is not None:
            w.a.copy_(a)
            w.b.copy_(b)
    for s, v in zip(steps, s_state):
        s.log_scale.copy_(v)
    for p, v in zip(biases, b_state):
        p.copy_(v)
    for m, (amax, lo, hi, shift) in zip(attentions, a_state):
        q = m.softmax_quantizer
        q.amax, q.range_min, q.range_max = amax, lo, hi
        m.softmax_shift = shift

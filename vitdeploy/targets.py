"""Deployment targets: what each device's TensorRT (or ONNX Runtime) can take.

Every decision that depends on where a model will run -- INT8 or not, where Q/DQ nodes go, whether
the ONNX is strongly typed, which precision LayerNorm keeps -- is read from a `Target` rather than
spread through the code as `if name == "jetson-orin"` checks. The registry is immutable: targets
are facts about hardware and TensorRT releases, not settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Optional, Tuple

from vitdeploy.errors import InputError

__all__ = [
    "Target",
    "get_target",
    "list_targets",
    "target_names",
    "target_rows",
    "format_targets_table",
    "ALIASES",
]


@dataclass(frozen=True)
class Target:
    """One deployment target and the contract its runtime imposes on the ONNX we hand it.

    Attributes:
        name: canonical registry name (``jetson-orin``, ``cpu`` ...).
        description: one line for humans.
        backend: ``"tensorrt"`` or ``"onnxruntime"``.
        trt_version: TensorRT release the target ships with (``"10.3"``); ``None`` off TensorRT.
        jetpack: JetPack release for Jetson boards, else ``None``.
        compute_capability: CUDA SM version as ``(major, minor)``; ``None`` when it varies or
            there is no GPU.
        trt_major_versions: TensorRT major versions supported, for checking an installed build.
        int8: whether the target gets INT8 (QDQ) ONNX at all.
        dla: whether a DLA core is available (optional offload of INT8/FP16 layers).
        strongly_typed: TensorRT strongly typed network: the precisions written in the ONNX are
            the precisions TensorRT uses (FP16 tensors are materialised in the ONNX).
        fp16: whether FP16 is used for the non-INT8 layers (build flag or typed tensors).
        layernorm_fp32: LayerNormalization must be pinned to FP32 (TensorRT otherwise runs it in
            FP16 under the FP16 flag, and the variance overflows).
        qdq_placement: which runtime's Q/DQ placement rules to follow: ``"tensorrt"``,
            ``"onnxruntime"``, or ``None`` when the target gets no Q/DQ.
        min_opset: lowest default-domain opset accepted (17 brings LayerNormalization).
        weight_bits: width of the per-channel weight codes. 8 for TensorRT (it sums INT8 products
            in int32). 7 (codes within ±63) for cpu: the only s8 weights that ONNX Runtime's x86
            AVX2 / AVX-512 kernels sum exactly for every input, so one file computes the same on
            every CPU (measurements and the alternatives in vitdeploy/cpu_isa.py and below).
        onnx_kind: short human description of the ONNX the target gets.
        warning: something the user must be told whenever this target is picked, else ``None``.
    """

    name: str
    description: str
    backend: str
    trt_version: Optional[str]
    jetpack: Optional[str]
    compute_capability: Optional[Tuple[int, int]]
    trt_major_versions: Tuple[int, ...]
    int8: bool
    dla: bool
    strongly_typed: bool
    fp16: bool
    layernorm_fp32: bool
    qdq_placement: Optional[str]
    onnx_kind: str
    min_opset: int = 17
    warning: Optional[str] = None
    weight_bits: int = 8

    @property
    def is_tensorrt(self) -> bool:
        """True when the model is compiled into a TensorRT engine for this target."""
        return self.backend == "tensorrt"

    @property
    def sm(self) -> Optional[str]:
        """Compute capability as NVIDIA writes it (``"sm_87"``), or ``None``."""
        if self.compute_capability is None:
            return None
        major, minor = self.compute_capability
        return f"sm_{major}{minor}"

    def describe(self) -> dict[str, str]:
        """One table row (all values strings) for `format_targets_table` / a CLI listing."""
        if self.is_tensorrt:
            runtime = f"TensorRT {self.trt_version}"
            if self.jetpack:
                runtime += f" (JetPack {self.jetpack})"
        else:
            runtime = "ONNX Runtime"
        int8 = "yes" if self.int8 else "no (FP16 engine)"
        if self.int8 and self.dla:
            int8 += ", DLA optional"
        return {
            "name": self.name,
            "runtime": runtime,
            "gpu": self.sm or "-",
            "int8": int8,
            "onnx": self.onnx_kind,
        }


_TX2_WARNING = (
    "Jetson TX2 (sm_62) has no fast INT8 in TensorRT: vitdeploy builds an FP16 engine from FP32 "
    "ONNX; expect FP16 speed and accuracy, not INT8"
)

_TARGETS: Tuple[Target, ...] = (
    Target(
        name="jetson-tx2",
        description="Jetson TX2, JetPack 4.6, TensorRT 8.2; FP16 only",
        backend="tensorrt",
        trt_version="8.2",
        jetpack="4.6",
        compute_capability=(6, 2),
        trt_major_versions=(8,),
        int8=False,
        dla=False,
        strongly_typed=False,
        fp16=True,
        layernorm_fp32=False,
        qdq_placement=None,
        onnx_kind="FP32 ONNX, FP16 build flag",
        warning=_TX2_WARNING,
    ),
    Target(
        name="jetson-xavier",
        description="Jetson AGX/NX Xavier, JetPack 5.1, TensorRT 8.5",
        backend="tensorrt",
        trt_version="8.5",
        jetpack="5.1",
        compute_capability=(7, 2),
        trt_major_versions=(8,),
        int8=True,
        dla=True,
        strongly_typed=False,
        fp16=True,
        layernorm_fp32=False,
        qdq_placement="tensorrt",
        onnx_kind="QDQ, weakly typed, FP16 build flag",
    ),
    Target(
        name="jetson-orin",
        description="Jetson AGX/NX/Nano Orin, JetPack 6, TensorRT 10.3",
        backend="tensorrt",
        trt_version="10.3",
        jetpack="6",
        compute_capability=(8, 7),
        trt_major_versions=(10,),
        int8=True,
        dla=True,
        strongly_typed=False,
        fp16=True,
        layernorm_fp32=True,
        qdq_placement="tensorrt",
        onnx_kind="QDQ, weakly typed, FP16 build flag, LayerNorm pinned to FP32",
    ),
    Target(
        name="desktop",
        description="Desktop/server NVIDIA GPU, TensorRT 10.x or 11.x",
        backend="tensorrt",
        trt_version="10.x/11.x",
        jetpack=None,
        compute_capability=None,  # whatever GPU the engine is built on
        trt_major_versions=(10, 11),
        int8=True,
        dla=False,
        strongly_typed=True,
        fp16=True,
        layernorm_fp32=False,
        qdq_placement="tensorrt",
        onnx_kind="QDQ, strongly typed (FP16 tensors in the ONNX)",
    ),
    Target(
        name="cpu",
        description="ONNX Runtime on the CPU",
        backend="onnxruntime",
        trt_version=None,
        jetpack=None,
        compute_capability=None,
        trt_major_versions=(),
        int8=True,
        dla=False,
        strongly_typed=False,
        fp16=False,
        layernorm_fp32=False,
        qdq_placement="onnxruntime",
        onnx_kind="QDQ placed for ONNX Runtime, exact on every CPU",
        # 7-bit weights, chosen by measurement (ONNX Runtime 1.32, x86 AVX512-VNNI host, 1 thread):
        # - speed: a 197x768 @ 768x3072 QDQ MatMul takes 1.12 ms with 7-bit s8 weights, 1.13 ms with
        #   8-bit s8 (not exact on AVX2) and 2.62 ms with u8 weights (zero point 128, exact: MLAS's U8U8
        #   kernel widens to int16); FP32 4.51 ms. 7-bit keeps the fast U8S8 kernel on every CPU.
        # - accuracy, agreement with FP32 of the default build, Q/DQ in float: cifar10_vit 98.68 %
        #   vs 98.73 % with 8-bit weights (10,000 test images); ImageNet ViT-Tiny 82.79 % vs 83.40 %
        #   (488 held-out images: 3 images, within this plan's noise: its fused-kernel run gives
        #   83.40 % vs 82.17 %). Weights are not where this model loses accuracy (issue: activations).
        # So there is one portable cpu file, no per-ISA variants.
        weight_bits=7,
    ),
)

_REGISTRY: Mapping[str, Target] = MappingProxyType({t.name: t for t in _TARGETS})

#: Extra names accepted by `get_target`, mapped to their canonical target.
ALIASES: Mapping[str, str] = MappingProxyType({"jetson": "jetson-orin"})


def target_names() -> list[str]:
    """Canonical target names, in registry order."""
    return [t.name for t in _TARGETS]


def list_targets() -> list[Target]:
    """All targets, in registry order (oldest device first, then desktop and CPU)."""
    return list(_TARGETS)


def get_target(name: str | Target) -> Target:
    """Look a target up by name or alias; a `Target` is returned unchanged.

    Matching ignores case, surrounding blanks and ``_`` vs ``-`` so that ``Jetson_Orin`` works
    from a shell. Raises InputError naming the valid choices when nothing matches.
    """
    if isinstance(name, Target):
        return name
    if not isinstance(name, str):
        raise InputError(f"target must be a name, got {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    key = ALIASES.get(key, key)
    target = _REGISTRY.get(key)
    if target is None:
        valid = ", ".join(target_names() + [f"{a} (= {t})" for a, t in ALIASES.items()])
        raise InputError(f"unknown target {name!r}; valid targets: {valid}")
    return target


def target_rows() -> list[dict[str, str]]:
    """`Target.describe()` rows for every target, for a CLI or a report."""
    return [t.describe() for t in _TARGETS]


_COLUMNS = (("name", "TARGET"), ("runtime", "RUNTIME"), ("gpu", "GPU"), ("int8", "INT8"),
            ("onnx", "ONNX IT GETS"))


def format_targets_table() -> str:
    """The targets as an aligned plain-text table (what ``vitdeploy targets`` prints).

    Ends with the alias list and any per-target warnings, so the TX2 caveat is visible before a
    user picks it.
    """
    rows = target_rows()
    widths = {key: max(len(title), *(len(r[key]) for r in rows)) for key, title in _COLUMNS}

    def line(values: Mapping[str, str]) -> str:
        return "  ".join(values[key].ljust(widths[key]) for key, _ in _COLUMNS).rstrip()

    lines = [line({key: title for key, title in _COLUMNS})]
    lines.append(line({key: "-" * widths[key] for key, _ in _COLUMNS}))
    lines.extend(line(r) for r in rows)
    lines.append("")
    lines.extend(f"alias: {alias} -> {canonical}" for alias, canonical in ALIASES.items())
    lines.extend(f"note: {t.name}: {t.warning}" for t in _TARGETS if t.warning)
    return "\n".join(lines)

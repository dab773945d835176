"""Which integer kernels ONNX Runtime's CPU provider runs on this host, and which QDQ files they compute exactly.

ONNX Runtime fuses ``DQ(x) · DQ(W)`` into integer kernels (``MatMulIntegerToFloat``, ``QGemm``,
``QLinearMatMul``) from MLAS, and MLAS picks the kernel by CPUID. Every kernel sums the integer
products in int32 except one instruction: ``vpmaddubsw`` (x86 AVX2, and AVX512BW without VNNI)
multiplies u8 × s8 and adds *pairs* of products into a **saturating int16**. A signed operand is
first moved to u8 (+128), so the u8 side spans 0..255 whatever the file says. A pair saturates
when ``255·|w0| + 255·|w1| > 32767``: exact for every input exactly when each s8 weight code is
within ±64 (2·255·64 = 32640), which is what ONNX Runtime's own ``reduce_range`` gives.

Measured with ONNX Runtime 1.32 on one QDQ MatMul (K = 256) with activations at the top of
their range, fused vs Q/DQ evaluated in float (``session.disable_quant_qdq``):

============================  ===================  ==================  ==================
format (activation × weight)  x86 AVX2 (emulated)  x86 AVX-512 VNNI    x86 AVX (no AVX2)
============================  ===================  ==================  ==================
u8 (zp 128) × s8 full range   rel. error 0.998     6.6e-7              6.2e-7
s8 × s8 full range            0.998                6.6e-7              6.2e-7
u8 (zp 128) × s8 within ±64   6.9e-7               6.9e-7              5.2e-7
u8 (zp 128) × u8 (zp 128)     6.6e-7               6.6e-7              6.2e-7
============================  ===================  ==================  ==================

"AVX2 (emulated)" and "AVX" ran the same ONNX Runtime wheel under ``qemu-x86_64 -cpu Haswell``
/ ``-cpu SandyBridge`` (TCG emulates the instructions, saturation included; CPUID says what a
real Haswell says), since no AVX2-only host was at hand. AVX-512 without VNNI (Skylake-SP) runs
``vpmaddubsw`` on 512 bits (MLAS's ``MultiplyAccumulateCellU8S8Avx512Core``): it saturates the same
way by the kernel's source, not measured here. AMX tiles and ARM64 (``sdot``/``udot``/``usmmla``, or
widening ``smull``) accumulate in int32 by their instruction sets: not measured here.
"""
from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

__all__ = ["FAMILIES", "SATURATING", "SAFE_S8_CODE", "host_isa", "exact_on", "weight_code_limit", "inexact_reason",
           "METADATA_KEY", "file_exact_on", "int8_operands"]

#: Kernel families, as written into build.json and the model's metadata ("exact on ...").
FAMILIES: Dict[str, str] = {
    "x86-avx2": "x86 AVX2 without VNNI (vpmaddubsw: u8×s8 pairs in saturating int16)",
    "x86-avx512": "x86 AVX-512 without VNNI (vpmaddubsw on 512 bits: saturating int16 pairs)",
    "x86-vnni": "x86 AVX-VNNI / AVX512-VNNI (vpdpbusd: int32 accumulation)",
    "x86-amx": "x86 AMX-INT8 (int32 tiles)",
    "x86-sse": "x86 SSE4.1 / AVX without AVX2 (products widened to int16, pmaddwd into int32)",
    "arm64": "ARM64 NEON / dot-product / i8mm (int32 accumulation)",
}
#: Families whose u8×s8 kernel saturates pair sums in int16.
SATURATING = ("x86-avx2", "x86-avx512")
#: |s8 weight code| at most this is exact on every family: 2 · 255 · 64 = 32640 <= 32767.
SAFE_S8_CODE = 64
METADATA_KEY = "vitdeploy.cpu_exact_on"

_QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")


def _classify_x86(flags: Iterable[str]) -> str:
    flags = set(flags)
    if {"amx_int8", "amx_tile"} <= flags:
        return "x86-amx"
    if flags & {"avx512_vnni", "avx_vnni", "avx512vnni"}:
        return "x86-vnni"
    if "avx512bw" in flags:
        return "x86-avx512"
    if "avx2" in flags:
        return "x86-avx2"
    return "x86-sse"


def _cpuid_flags() -> Optional[set]:
    """x86 features from CPUID as numpy's dispatcher read them, in /proc/cpuinfo's spelling; None if unknown."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            return None
    names = {"AVX2": "avx2", "AVX512BW": "avx512bw", "AVX512VNNI": "avx512_vnni"}
    return {flag for key, flag in names.items() if features.get(key)}


def _proc_flags() -> Optional[set]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return None


@lru_cache(maxsize=1)
def host_isa() -> str:
    """This machine's kernel family (a key of `FAMILIES`), or ``"unknown"``.

    x86: CPUID as numpy read it (what MLAS reads too, also under an emulator), plus AVX-VNNI and
    AMX from /proc/cpuinfo when that file describes the same CPU (an emulator passes the host's
    through). ARM64 is one family: every MLAS kernel there accumulates in int32.
    """
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return "arm64"
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return "unknown"
    cpuid, proc = _cpuid_flags(), _proc_flags()
    if cpuid is None and proc is None:
        return "unknown"
    if cpuid is None:
        return _classify_x86(proc)
    known = {"avx2", "avx512bw", "avx512_vnni"}
    extras = proc & {"avx_vnni", "amx_int8", "amx_tile"} if proc is not None and proc & known == cpuid else set()
    return _classify_x86(cpuid | extras)


def weight_code_limit(family: str) -> int:
    """Largest |s8 code| of the weight side that ``family`` sums exactly for every input."""
    return SAFE_S8_CODE if family in SATURATING else 128


def int8_operands(model) -> Iterable[Tuple[str, Optional[int], str]]:
    """(node name, largest |code| of its signed second operand or None if unsigned, "weight"/"activation")."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {out: n for n in graph.node for out in n.output}
    for node in graph.node:
        if node.op_type not in _QUANTIZED_OPS or len(node.input) < 2:
            continue
        a, b = producer.get(node.input[0]), producer.get(node.input[1])
        if a is None or b is None or a.op_type != "DequantizeLinear" or b.op_type != "DequantizeLinear":
            continue  # ONNX Runtime computes this node in float
        source = b.input[0]
        if source in inits:
            init = inits[source]
            if init.data_type != onnx.TensorProto.INT8:
                yield node.name, None, "weight"
                continue
            codes = numpy_helper.to_array(init).astype(np.int16)
            yield node.name, int(np.abs(codes).max()) if codes.size else 0, "weight"
        else:
            q = producer.get(source)
            zp = inits.get(q.input[2]) if q is not None and len(q.input) > 2 else None
            signed = zp is None or zp.data_type == onnx.TensorProto.INT8
            yield node.name, 128 if signed else None, "activation"


def exact_on(model) -> List[str]:
    """The families whose fused kernels compute this QDQ model's float Q/DQ result exactly."""
    worst = max((code for _, code, _ in int8_operands(model) if code is not None), default=0)
    return [f for f in FAMILIES if worst <= weight_code_limit(f)]


def file_exact_on(path) -> List[str]:
    """`exact_on` of an ONNX file: from its metadata when vitdeploy wrote it, else from its graph."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return [f for f in prop.value.split(",") if f]
    return exact_on(model)


def inexact_reason(path, family: Optional[str] = None) -> Optional[str]:
    """One sentence when ``path`` is not computed exactly by this host's fused kernels, else None."""
    family = family or host_isa()
    if family == "unknown":
        return None
    try:
        exact = file_exact_on(path)
    except Exception:  # noqa: BLE001 - an unreadable file fails later, where it is loaded
        return None
    if family in exact:
        return None
    return (f"{Path(path).name} holds full-range INT8 operands, which ONNX Runtime's integer kernels on this CPU "
            f"({FAMILIES.get(family, family)}) do not compute exactly: results differ from TensorRT and from other "
            f"CPUs; build it with --target cpu (exact on every CPU), or evaluate with --float-qdq")

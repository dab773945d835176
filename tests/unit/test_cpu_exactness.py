"""Issue 13: INT8 that computes the same on every CPU.

ONNX Runtime's fused u8×s8 kernel on x86 AVX2 / AVX-512 without VNNI sums pairs of products in
saturating int16 (vitdeploy/cpu_isa.py). These tests run a crafted QDQ MatMul, written by the
exporter itself, whose activations sit at the top of their range and whose weights are full range
with matching signs: the worst input there is. Each format the exporter emits is run with ONNX
Runtime's fused kernels and with Q/DQ in float. The cpu formats must agree on any host; the
TensorRT format (8-bit weights) must be exact exactly where `cpu_isa.exact_on` says so, which
holds the exactness model to what this host's kernels really do. With `qemu-x86_64` installed the
same check also runs on an emulated AVX2 CPU (Haswell), so a VNNI host catches saturation too.
"""
from __future__ import annotations

import json
import logging
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from vitdeploy import cpu_isa
from vitdeploy.export.ort_placement import place_for_onnxruntime
from vitdeploy.artifacts import ModelSpec
from vitdeploy.export.qdq import export_int8
from vitdeploy.lint import lint_errors, lint_model
from vitdeploy.measure.kernel_check import check_integer_kernels
from vitdeploy.quantize.layers import QuantLinear
from vitdeploy.quantize.techniques import set_num_bits
from vitdeploy.targets import get_target

K, N = 256, 16
RTOL = 1e-5


def _weights() -> np.ndarray:
    """[N, K]: every weight at ±0.5 (so at ±amax: the largest codes), signs random."""
    rng = np.random.default_rng(0)
    return (np.sign(rng.standard_normal((N, K))) * 0.5).astype(np.float32)


def exported(target: str, input_mode: str = "int8") -> onnx.ModelProto:
    """The crafted layer as the exporter writes it for ``target`` (cpu: placed for ONNX Runtime)."""
    weight = _weights()
    layer = torch.nn.Linear(K, N)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        layer.bias.fill_(0.1)
    q = QuantLinear.from_float(layer, unsigned=input_mode == "uint8")
    set_num_bits(q, weights=get_target(target).weight_bits)
    if input_mode == "uint8":
        q.input_quantizer.set_range(-1.0, 1.5)   # a non-zero zero point
    else:
        q.input_quantizer.set_amax(1.0)
    # x[1, N, K] @ Wᵀ + b, laid out like a ViT's token MatMul (a 2-D one would become a float Gemm).
    spec = ModelSpec(name="fc", input_size=(N, K), mean=(0.0,), std=(1.0,), num_classes=N, input_name="x",
                     output_name="y")
    model = export_int8(q, spec, onnx.ModelProto())
    if get_target(target).qdq_placement == "onnxruntime":
        model = place_for_onnxruntime(model)
    return model


def worst_inputs() -> np.ndarray:
    """One row per output column: +1 (top of the range) where its weight is > 0, -1 elsewhere."""
    return np.where(_weights() > 0, 1.0, -1.0).astype(np.float32)[None]


def fused_vs_float(model: onnx.ModelProto, x: np.ndarray) -> float:
    outputs = []
    for disable in (False, True):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if disable:
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {"x": x})[0].astype(np.float64))
    return float(np.abs(outputs[0] - outputs[1]).max() / np.abs(outputs[1]).max())


def _fused_ops(model: onnx.ModelProto, tmp_path) -> set:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}


# ------------------------------------------------------------------------------------ on this host

@pytest.mark.parametrize("input_mode", ["int8", "uint8"])
def test_cpu_formats_compute_the_float_qdq_result_on_this_host(input_mode, tmp_path):
    model = exported("cpu", input_mode)
    assert "MatMulIntegerToFloat" in _fused_ops(model, tmp_path)   # the integer kernel really runs
    assert fused_vs_float(model, worst_inputs()) <= RTOL
    assert cpu_isa.exact_on(model) == list(cpu_isa.FAMILIES)


def test_tensorrt_format_is_exact_exactly_where_the_model_of_the_kernels_says(tmp_path):
    model = exported("jetson-orin")
    assert "MatMulIntegerToFloat" in _fused_ops(model, tmp_path)
    exact_here = fused_vs_float(model, worst_inputs()) <= RTOL
    claimed = cpu_isa.exact_on(model)
    assert "x86-avx2" not in claimed and "x86-avx512" not in claimed and "x86-vnni" in claimed
    if cpu_isa.host_isa() != "unknown":
        assert exact_here == (cpu_isa.host_isa() in claimed)
        assert check_integer_kernels(model).exact == exact_here


def test_kernel_check_passes_the_cpu_file_and_counts_its_layers():
    check = check_integer_kernels(exported("cpu"))
    assert check.layers == 1 and check.exact and check.max_rel_error <= RTOL


def test_the_saturation_bound():
    # u8 up to 255 times |s8| <= 64, summed in pairs, fits int16; one code more does not.
    assert 2 * 255 * cpu_isa.SAFE_S8_CODE <= 32767 < 2 * 255 * (cpu_isa.SAFE_S8_CODE + 1)
    assert get_target("cpu").weight_bits == 7 and 2 ** 6 - 1 <= cpu_isa.SAFE_S8_CODE
    codes = [c for _, c, _ in cpu_isa.int8_operands(exported("cpu"))]
    assert codes == [63]
    assert [c for _, c, _ in cpu_isa.int8_operands(exported("jetson-orin"))] == [127]


def test_cpu_lint_rejects_saturating_operands():
    trt_style = place_for_onnxruntime(exported("jetson-orin"))     # 8-bit weights placed for ONNX Runtime
    errors = lint_errors(lint_model(trt_style, "cpu"))
    assert [e.rule for e in errors] == ["cpu-saturating-operand"] and "±64" in errors[0].message
    assert lint_errors(lint_model(exported("cpu"), "cpu")) == []
    assert lint_errors(lint_model(exported("jetson-orin"), "jetson-orin")) == []   # TensorRT sums in int32


@pytest.mark.parametrize("flags, family", [
    ({"avx2"}, "x86-avx2"),
    ({"avx2", "avx512bw"}, "x86-avx512"),
    ({"avx2", "avx512bw", "avx512_vnni"}, "x86-vnni"),
    ({"avx2", "avx_vnni"}, "x86-vnni"),
    ({"avx2", "avx512bw", "avx512_vnni", "amx_int8", "amx_tile"}, "x86-amx"),
    ({"sse4_1", "avx"}, "x86-sse"),
])
def test_host_classification(flags, family):
    assert cpu_isa._classify_x86(flags) == family


def test_host_isa_is_a_known_family():
    assert cpu_isa.host_isa() in set(cpu_isa.FAMILIES) | {"unknown"}


def test_runner_warns_where_a_file_is_not_exact(tmp_path, monkeypatch, caplog):
    from vitdeploy.backends.ort import OrtRunner

    path = tmp_path / "model.int8.onnx"
    onnx.save(exported("jetson-orin"), str(path))
    monkeypatch.setattr(cpu_isa, "host_isa", lambda: "x86-avx2")
    with caplog.at_level(logging.WARNING, logger="vitdeploy"):
        with OrtRunner(path):
            pass
    assert any("do not compute exactly" in r.getMessage() and "--float-qdq" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vitdeploy"):
        with OrtRunner(path, qdq="float"):
            pass
        cpu_path = tmp_path / "cpu.onnx"
        onnx.save(exported("cpu"), str(cpu_path))
        with OrtRunner(cpu_path):
            pass
    assert not caplog.records


def test_build_records_cpu_exactness(tiny_vit, calib_npz, tmp_path):
    from vitdeploy.cli import main

    for target in ("cpu", "jetson-orin"):
        out = tmp_path / target
        assert main(["build", str(tiny_vit.module), "--trust-pickle", "--calib", str(calib_npz), "--target", target,
                     "--out", str(out), "--quiet", "--verify-min-agreement", "0", "--verify-min-cosine", "0"]) == 0
        record = json.loads((out / "build.json").read_text())
        meta = {p.key: p.value for p in onnx.load(str(out / "model.int8.onnx")).metadata_props}
        assert meta[cpu_isa.METADATA_KEY].split(",") == record["cpu"]["exact_on"]
        assert record["cpu"]["host_isa"] == cpu_isa.host_isa()
        assert "Q/DQ evaluated in float" in record["verification"]["reference"]
        if target == "cpu":
            assert record["cpu"]["exact_on"] == list(cpu_isa.FAMILIES)
            assert record["verification"]["int8_host"]["kernels"]["exact"]
            assert record["cpu"]["verified_on"] == [cpu_isa.host_isa()]
        else:
            assert "x86-avx2" not in record["cpu"]["exact_on"] and "int8_host" not in record["verification"]


# ------------------------------------------------------------------------------ on an emulated AVX2

# Runs under the emulator: numpy, onnx and ONNX Runtime only (torch under emulation is slow).
_EMULATED = textwrap.dedent("""
    import sys
    import numpy as np, onnx, onnxruntime as ort
    sys.path.insert(0, {root!r})
    from vitdeploy.cpu_isa import host_isa
    from vitdeploy.measure.kernel_check import check_integer_kernels
    x = np.load(sys.argv[1] + "/x.npy")
    out = {{"isa": host_isa()}}
    for name in ("cpu", "trt"):
        model = onnx.load(sys.argv[1] + "/" + name + ".onnx")
        runs = []
        for disable in (False, True):
            options = ort.SessionOptions()
            if disable:
                options.add_session_config_entry("session.disable_quant_qdq", "1")
            session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            runs.append(session.run(None, {{"x": x}})[0].astype(np.float64))
        out[name] = float(np.abs(runs[0] - runs[1]).max() / np.abs(runs[1]).max())
        out[name + "_check"] = check_integer_kernels(model).exact
    print(out)
""")


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None or platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="qemu-x86_64 not installed (apt-get install qemu-user): no emulated AVX2 CPU")
def test_on_an_emulated_avx2_cpu(tmp_path):
    onnx.save(exported("cpu"), str(tmp_path / "cpu.onnx"))
    onnx.save(exported("jetson-orin"), str(tmp_path / "trt.onnx"))
    np.save(tmp_path / "x.npy", worst_inputs())
    script = tmp_path / "emulated.py"
    script.write_text(_EMULATED.format(root=str(Path(__file__).resolve().parents[2])))
    result = subprocess.run(["qemu-x86_64", "-cpu", "Haswell", sys.executable, str(script), str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = eval(result.stdout.strip().splitlines()[-1])  # noqa: S307 - our own script's dict
    assert out["isa"] == "x86-avx2"
    assert out["trt"] > 1e-2 and not out["trt_check"]    # the emulator saturates: the check is real
    assert out["cpu"] <= RTOL and out["cpu_check"]       # the cpu file does not

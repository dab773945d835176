"""The device scripts' own logic, without TensorRT: the build plan, LayerNorm matching, inspector parsing,
calibration data, model.engine.json and portability, and the scripts' behaviour where TensorRT is absent.

TensorRT itself (through Polygraphy) is exercised only where it exists: tests/gpu. Nothing here fakes it:
the plan takes the handful of facts `detect_api` reads from a real module, as plain data.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vitdeploy.errors import BuildError, InputError
from vitdeploy.runtime import (TrtRunner, check_engine_compatible, engine_metadata_path, load_engine_metadata,
                               validate_engine_metadata)
from vitdeploy.trt import build_engine as be

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "vitdeploy" / "trt" / "build_engine.py"
LAUNCHER = ROOT / "jetson" / "build_engine.py"

#: What `detect_api` reads from each release (TensorRT 8.5: JetPack 5.1; 10.3: JetPack 6; 11: no weak typing).
CAPS = {
    "8.5": dict(version="8.5.2.2", strongly_typed_only=False, strongly_typed_available=False, implicit_int8=True,
                implicit_int8_deprecated=False, dla=True),
    "10.3": dict(version="10.3.0.30", strongly_typed_only=False, strongly_typed_available=True, implicit_int8=True,
                 implicit_int8_deprecated=True, dla=True),
    "11": dict(version="11.0.0", strongly_typed_only=True, strongly_typed_available=True, implicit_int8=False,
               implicit_int8_deprecated=True, dla=True),
}
TX2 = {"has_fast_int8": False, "has_fast_fp16": True, "num_dla_cores": 0}
XAVIER = ORIN = {"has_fast_int8": True, "has_fast_fp16": True, "num_dla_cores": 2}
DESKTOP = {"has_fast_int8": True, "has_fast_fp16": True, "num_dla_cores": 0}
UNKNOWN = {"has_fast_int8": None, "has_fast_fp16": None, "num_dla_cores": None}


def args(*extra):
    return be.parse_args(["model.onnx", "--out", "model.engine", *extra])


def plan(version, *extra, platform=None):
    return be.plan_build(args(*extra), CAPS[version], platform)


# ---------------------------------------------------------------------------------------------
# plan_build
# ---------------------------------------------------------------------------------------------


def test_plan_no_fast_int8_falls_back_to_fp16_with_one_warning():
    p = plan("8.5", "--precision", "int8", "--trt-calibrator", "entropy", "--calib", "c.npy", platform=TX2)
    assert (p.precision, p.fp16, p.int8, p.calibrate) == ("fp16", True, False, False)
    assert len(p.warnings) == 1 and "no fast INT8" in p.warnings[0] and "calibration skipped" in p.warnings[0]


def test_plan_int8_keeps_fp16_for_what_has_no_qdq():
    p = plan("8.5", platform=XAVIER)
    assert (p.precision, p.int8, p.fp16, p.strongly_typed, p.warnings) == ("int8", True, True, False, [])
    assert p.batch == (1, 1, 8) and p.workspace_bytes is None  # Polygraphy's default pool: the device memory


def test_plan_dla():
    p = plan("8.5", "--dla", "1", "--min-batch", "4", "--max-batch", "4", platform=XAVIER)
    assert p.dla_core == 1 and p.batch == (4, 4, 4) and p.warnings == []
    with pytest.raises(be.UsageError, match="2 DLA core"):
        plan("8.5", "--dla", "2", platform=XAVIER)
    with pytest.raises(be.UsageError, match="FP16 and INT8 only"):
        plan("8.5", "--dla", "0", "--precision", "fp32", platform=XAVIER)
    assert any("dynamic shapes" in w for w in plan("8.5", "--dla", "0", platform=XAVIER).warnings)


def test_plan_layernorm_fp32_and_workspace():
    p = plan("10.3", "--layernorm-fp32", "--workspace", "2048", platform=ORIN)
    assert p.pin_layernorm_fp32 and p.workspace_bytes == 2048 * be.MIB and p.warnings == []
    assert not plan("10.3", "--precision", "fp32", "--layernorm-fp32", platform=ORIN).pin_layernorm_fp32


def test_plan_strongly_typed():
    p = plan("10.3", "--strongly-typed", "--layernorm-fp32", platform=DESKTOP)
    assert p.strongly_typed and p.precision == "strongly-typed" and not (p.fp16 or p.int8 or p.pin_layernorm_fp32)
    assert "keeps the ONNX's types" in p.warnings[0]
    with pytest.raises(be.UsageError, match="TensorRT 10 or newer"):
        plan("8.5", "--strongly-typed", platform=XAVIER)


def test_plan_trt11_is_always_strongly_typed():
    p = plan("11", platform=UNKNOWN)
    assert p.strongly_typed and not (p.fp16 or p.int8) and p.warnings == []
    p = plan("11", "--precision", "fp16", platform=UNKNOWN)
    assert len(p.warnings) == 1 and "strongly typed networks only" in p.warnings[0]


def test_plan_entropy_calibrates_unless_told_to_reuse_a_cache(tmp_path):
    """The suspected bug of the hand-written calibrator: a non-empty cache silently replaced calibration."""
    p = plan("8.5", "--trt-calibrator", "entropy", "--calib", "c.npy", "--calib-cache", "c.cache", platform=XAVIER)
    assert p.calibrate and not p.reuse_calib_cache and p.warnings == []
    p = plan("10.3", "--trt-calibrator", "entropy", "--calib", "c.npy", platform=ORIN)
    assert p.calibrate and "deprecated since TensorRT 10.1" in p.warnings[0]
    cache = tmp_path / "entropy.cache"
    with pytest.raises(be.UsageError, match="no calibration cache"):
        plan("8.5", "--trt-calibrator", "entropy", "--calib-cache", str(cache), "--reuse-calib-cache", platform=ORIN)
    cache.write_bytes(b"TRT-8502-EntropyCalibration2\ninput: 3c000000\n")
    p = plan("8.5", "--trt-calibrator", "entropy", "--calib-cache", str(cache), "--reuse-calib-cache", platform=ORIN)
    assert p.calibrate and p.reuse_calib_cache


@pytest.mark.parametrize("version, extra, message", [
    ("11", ["--calib", "c.npy"], "no IInt8EntropyCalibrator2"),
    ("10.3", ["--calib", "c.npy", "--strongly-typed"], "weakly typed"),
    ("8.5", ["--calib", "c.npy", "--precision", "fp16"], "needs --precision int8"),
    ("8.5", [], "needs --calib"),
])
def test_plan_entropy_calibrator_refusals(version, extra, message):
    with pytest.raises(be.UsageError, match=message):
        plan(version, "--trt-calibrator", "entropy", *extra, platform=ORIN)


def test_plan_calib_without_calibrator_warns():
    assert "ignored without --trt-calibrator" in plan("10.3", "--calib", "c.npy", platform=ORIN).warnings[0]


@pytest.mark.parametrize("extra", [["--min-batch", "4", "--opt-batch", "2"], ["--max-batch", "0"],
                                   ["--workspace", "0"]])
def test_plan_rejects_bad_numbers(extra):
    with pytest.raises(be.UsageError):
        plan("10.3", *extra, platform=ORIN)


def test_plan_batch_defaults():
    assert plan("10.3", platform=ORIN).batch == (1, 1, 8)
    assert plan("10.3", "--opt-batch", "16", platform=ORIN).batch == (1, 16, 16)


# ---------------------------------------------------------------------------------------------
# Pure helpers on TensorRT-shaped data
# ---------------------------------------------------------------------------------------------


def _layer(index, kind, inputs, outputs, name=None):
    return {"index": index, "name": name or f"layer{index}", "type": kind, "inputs": inputs, "outputs": outputs}


def test_find_layernorm_layers_decomposed_and_fused():
    records = [
        _layer(0, "MATRIX_MULTIPLY", ["in", "w"], ["x"]),
        _layer(1, "REDUCE", ["x"], ["mean"]),                  # ReduceMean
        _layer(2, "ELEMENTWISE", ["x", "mean"], ["d"]),         # Sub
        _layer(3, "CONSTANT", [], ["two"]),
        _layer(4, "ELEMENTWISE", ["d", "two"], ["d2"]),         # Pow
        _layer(5, "REDUCE", ["d2"], ["var"]),                   # ReduceMean
        _layer(6, "ELEMENTWISE", ["var", "eps"], ["var_eps"]),  # Add
        _layer(7, "UNARY", ["var_eps"], ["std"]),               # Sqrt
        _layer(8, "ELEMENTWISE", ["d", "std"], ["normed"]),     # Div
        _layer(9, "ELEMENTWISE", ["normed", "gamma"], ["scaled"]),
        _layer(10, "REDUCE", ["scaled"], ["pooled"]),            # mean pooling head: not a LayerNorm
        _layer(11, "NORMALIZATION", ["pooled", "g", "b"], ["out"]),
    ]
    assert be.find_layernorm_layers(records) == [1, 2, 4, 5, 6, 7, 8, 11]
    assert be.find_layernorm_layers(records[:1] + records[9:11]) == []


def test_layer_precisions_from_inspector_trt8_10_and_11():
    trt10 = {"Layers": [
        {"Name": "/blocks.0/attn/qkv/MatMul", "LayerType": "CaskGemm",
         "Outputs": [{"Name": "qkv", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}]},
        {"Name": "/blocks.0/norm1/LayerNorm", "LayerType": "Normalization",
         "Outputs": [{"Name": "n", "Format/Datatype": "Row major linear FP32"}]},
        {"Name": "reformat", "LayerType": "Reformat",
         "Outputs": [{"Format/Datatype": "Channel major FP16 format where channel % 8 == 0"},
                     {"Format/Datatype": "Row major linear FP32"}]},
    ], "Bindings": ["input", "logits"]}
    assert be.layer_precisions_from_inspector(json.dumps(trt10)) == [
        {"name": "/blocks.0/attn/qkv/MatMul", "type": "CaskGemm", "precision": "int8"},
        {"name": "/blocks.0/norm1/LayerNorm", "type": "Normalization", "precision": "fp32"},
        {"name": "reformat", "type": "Reformat", "precision": "fp16+fp32"},
    ]
    trt11 = {"Layers": [{"Name": "softmax", "LayerType": "Softmax",
                         "Outputs": [{"Name": "p", "DataType": "Half", "Format": "Row major linear (kLINEAR)"}]}],
             "I/O Tensors": [{"Name": "input", "IOMode": "Input", "DataType": "Float"}]}
    assert be.layer_precisions_from_inspector(trt11)[0]["precision"] == "fp16"
    names_only = {"Layers": ["conv1", "gemm"], "Bindings": ["input"]}
    assert be.layer_precisions_from_inspector(names_only) == [
        {"name": "conv1", "type": None, "precision": None}, {"name": "gemm", "type": None, "precision": None}]


def test_calibration_data(tmp_path):
    good = tmp_path / "calib.npy"
    np.save(good, np.arange(5 * 3 * 4 * 4, dtype=np.float32).reshape(5, 3, 4, 4))
    array = be.load_calibration_array(str(good), [3, 4, 4])
    batches = list(be.calibration_batches(array, "input", 2))  # whole batches only: 4 of 5 samples
    assert [b["input"].shape for b in batches] == [(2, 3, 4, 4)] * 2 and batches[0]["input"].dtype == np.float32
    np.testing.assert_array_equal(np.concatenate([b["input"] for b in batches]), array[:4])
    with pytest.raises(be.UsageError, match="fewer than one calibration batch"):
        list(be.calibration_batches(array, "input", 8))
    with pytest.raises(be.UsageError, match="float32 N x 3 x 8 x 8"):
        be.load_calibration_array(str(good), [3, 8, 8])
    wrong = tmp_path / "uint8.npy"
    np.save(wrong, np.zeros((5, 3, 4, 4), np.uint8))
    with pytest.raises(be.UsageError, match="float32"):
        be.load_calibration_array(str(wrong), [3, 4, 4])


# ---------------------------------------------------------------------------------------------
# The scripts, run the way a user runs them (TensorRT blocked even where it is installed)
# ---------------------------------------------------------------------------------------------


def _run_without_trt(script, *argv, cwd=None):
    """Run ``script`` as __main__ in a fresh interpreter where ``import tensorrt`` fails."""
    code = ("import runpy, sys; sys.modules['tensorrt'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, str(script), *map(str, argv)], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


@pytest.mark.parametrize("script", [SCRIPT, LAUNCHER], ids=["vitdeploy/trt", "jetson"])
def test_help_works_without_tensorrt(script):
    result = _run_without_trt(script, "--help")
    assert result.returncode == 0, result.stderr
    assert "--trt-calibrator" in result.stdout and "--reuse-calib-cache" in result.stdout


@pytest.mark.parametrize("script", [SCRIPT, LAUNCHER], ids=["vitdeploy/trt", "jetson"])
def test_build_without_tensorrt_exits_2_with_one_line(script, tmp_path):
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"\x08\x08")  # never read: TensorRT is missing first
    result = _run_without_trt(script, onnx_file, "--out", tmp_path / "model.engine", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "TensorRT not found" in lines[0] and "on the device" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_missing_onnx_exits_2_with_one_line(tmp_path):
    result = _run_without_trt(SCRIPT, tmp_path / "nope.onnx", "--out", tmp_path / "m.engine")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: ONNX model not found: {tmp_path / 'nope.onnx'}"]


def test_script_copied_anywhere_runs(tmp_path):
    """A bundle carries build_engine.py alone (benchmark.py loads it from its folder): --help from elsewhere."""
    folder = tmp_path / "somewhere"
    folder.mkdir()
    shutil.copy(SCRIPT, folder / "build_engine.py")
    result = _run_without_trt(folder / "build_engine.py", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_script_imports_only_what_the_device_has():
    """No vitdeploy, no torch on the device: the standard library, NumPy, TensorRT and Polygraphy."""
    import ast

    imported = set()
    for node in ast.walk(ast.parse(SCRIPT.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"argparse", "ctypes", "dataclasses", "datetime", "json", "os", "re", "sys", "tempfile",
                        "typing", "numpy", "tensorrt", "polygraphy"}, imported


# ---------------------------------------------------------------------------------------------
# Engine metadata and portability (vitdeploy.runtime)
# ---------------------------------------------------------------------------------------------


def good_meta(**overrides):
    """Metadata exactly as build_engine.make_metadata writes it (writer and validator agree)."""
    p = be.plan_build(args("--layernorm-fp32"), CAPS["10.3"], ORIN)
    meta = be.make_metadata(
        be.parse_args(["/tmp/model.onnx", "--out", "model.engine"]), "10.3.0.30",
        {"name": "Orin", "compute_capability": [8, 7]}, p,
        [{"name": "input", "shape": [-1, 3, 224, 224], "dtype": "float32"}],
        [{"name": "logits", "shape": [-1, 1000], "dtype": "float32"}],
        [{"name": "gemm", "type": "CaskGemm", "precision": "int8"}], ["/blocks.0/norm1/LayerNorm"], True,
        {"mean": [0.5] * 3, "std": [0.5] * 3, "input_size": [3, 224, 224]}, None)
    meta.update(overrides)
    return meta


def test_good_metadata_validates_and_round_trips(tmp_path):
    meta = good_meta()
    assert validate_engine_metadata(meta) is meta
    assert meta["precision"]["builder_flags"] == ["FP16", "INT8"] and meta["precision"]["layernorm_fp32"]
    assert meta["onnx"] == "model.onnx" and meta["built_at"].endswith("+00:00")
    path = tmp_path / "model.engine.json"
    path.write_text(json.dumps(meta))
    assert load_engine_metadata(path) == meta
    assert engine_metadata_path(tmp_path / "model.engine") == path
    # Unknown device and static batch are valid too.
    assert validate_engine_metadata(good_meta(device={"name": None, "compute_capability": None},
                                              batch_profile=None, layers=None, preprocessing=None))


@pytest.mark.parametrize("change, message", [
    (dict(schema="vitdeploy.engine/0"), "'schema'"),
    (dict(tensorrt_version=10), "'tensorrt_version'"),
    (dict(device={"name": "Orin", "compute_capability": [8]}), "compute_capability"),
    (dict(device={"name": "Orin", "compute_capability": ["8", "7"]}), "compute_capability"),
    (dict(precision={"built": "int4", "strongly_typed": False, "builder_flags": []}), "precision.built"),
    (dict(precision={"built": "int8", "strongly_typed": "no", "builder_flags": []}), "strongly_typed"),
    (dict(inputs=[]), "'inputs' must not be empty"),
    (dict(inputs=[{"name": "input", "shape": [None, 3], "dtype": "float32"}]), "inputs[0].shape"),
    (dict(outputs=[{"name": 1, "shape": [1], "dtype": "float32"}]), "outputs[0].name"),
    (dict(batch_profile={"min": 2, "opt": 1, "max": 8}), "batch_profile"),
    (dict(batch_profile={"min": True, "opt": 1, "max": 8}), "batch_profile"),
    (dict(layers=[{"precision": "int8"}]), "layers[0]"),
    (dict(preprocessing=[0.5]), "preprocessing"),
])
def test_bad_metadata_is_rejected(change, message):
    with pytest.raises(InputError, match=re.escape(message)):
        validate_engine_metadata(good_meta(**change), source="m.engine.json")


def test_metadata_missing_keys_and_bad_files(tmp_path):
    meta = good_meta()
    del meta["device"], meta["inputs"]
    with pytest.raises(InputError, match=r"missing key\(s\) \['device', 'inputs'\]"):
        validate_engine_metadata(meta)
    with pytest.raises(InputError, match="expected a JSON object"):
        validate_engine_metadata([])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="cannot read engine metadata"):
        load_engine_metadata(bad)
    with pytest.raises(InputError, match="not found"):
        load_engine_metadata(tmp_path / "missing.json")


def test_compatible_engine():
    verdict = check_engine_compatible(good_meta(), "Orin", (8, 7), "10.3.0.30")
    assert verdict.ok and verdict.errors == () and verdict.warnings == ()


def test_incompatible_gpu_and_tensorrt_are_explained():
    verdict = check_engine_compatible(good_meta(), "NVIDIA GeForce RTX 3090", (8, 6), "8.6.1.6")
    assert not verdict.ok and len(verdict.errors) == 2
    trt_error, gpu_error = verdict.errors
    assert "TensorRT 10.3.0.30, this is TensorRT 8.6.1.6" in trt_error and "rebuild" in trt_error
    assert "sm_87" in gpu_error and "sm_86" in gpu_error and "GPU architecture" in gpu_error
    assert verdict.explain().startswith("error: ")


def test_tensorrt_build_number_does_not_matter_but_patch_does():
    assert check_engine_compatible(good_meta(), "Orin", [8, 7], "10.3.0.26").ok
    assert not check_engine_compatible(good_meta(), "Orin", [8, 7], "10.3.1").ok


def test_same_architecture_other_gpu_is_a_warning():
    verdict = check_engine_compatible(good_meta(), "Jetson Orin NX", (8, 7), "10.3.0")
    assert verdict.ok and len(verdict.warnings) == 1 and "timed on the other GPU" in verdict.warnings[0]


def test_unknown_devices_are_warnings():
    meta = good_meta(device={"name": None, "compute_capability": None})
    verdict = check_engine_compatible(meta, "Orin", (8, 7), "10.3.0")
    assert verdict.ok and "does not say which GPU" in verdict.warnings[0]
    verdict = check_engine_compatible(good_meta(), None, None, None)
    assert verdict.ok and len(verdict.warnings) == 2


def test_trt_runner_without_tensorrt_raises_build_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, even where installed
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"engine")
    with pytest.raises(BuildError) as info:
        TrtRunner(engine)
    message = str(info.value)
    assert "TensorRT not found" in message and "\n" not in message

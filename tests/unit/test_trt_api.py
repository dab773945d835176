"""TensorRT build/run decision logic, without TensorRT or a GPU.

`detect_api` and `plan_build` are fed ``SimpleNamespace`` modules shaped like the attribute sets of
TensorRT 8.2 (JetPack 4.6), 8.5 (JetPack 5.1), 10.3 (JetPack 6) and 11.x. They test which flags we
*decide* to set -- nothing here builds or pretends to build an engine (tests/gpu does that for
real). Attribute sets follow NVIDIA's Python API references and migration guides:

* 8.2: ``max_workspace_size`` (no memory pools until 8.4), ``EXPLICIT_BATCH``, both
  ``STRICT_TYPES`` and ``OBEY_PRECISION_CONSTRAINTS``, engine inspector and
  ``ProfilingVerbosity.DETAILED`` (new in 8.2), bindings API only.
* 8.5: adds ``set_memory_pool_limit``/``MemoryPoolType`` and the name-based tensor API
  (``num_io_tensors``, ``execute_async_v3``) beside the bindings API.
* 10.x: implicit batch gone (``Builder.max_batch_size``, ``max_workspace_size``, ``STRICT_TYPES``,
  bindings API removed), ``EXPLICIT_BATCH`` deprecated, ``STRONGLY_TYPED`` added,
  ``IInt8EntropyCalibrator2`` documented "[DEPRECATED] Deprecated in TensorRT 10.1".
* 11.x: weak typing removed (``BuilderFlag.FP16/INT8/OBEY_PRECISION_CONSTRAINTS``,
  ``int8_calibrator``, ``set_calibration_profile``, ``platform_has_fast_int8`` gone); every
  network is strongly typed; inspector JSON says ``DataType`` instead of ``Format/Datatype``.
"""
from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from vitdeploy.errors import BuildError, InputError
from vitdeploy.trt import build_engine as be

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "vitdeploy" / "trt" / "build_engine.py"
DEVICE = REPO / "vitdeploy" / "trt" / "device.py"  # the sibling both device scripts load by path
LAUNCHER = REPO / "jetson" / "build_engine.py"


# ---------------------------------------------------------------------------------------------
# Fake tensorrt modules: attribute sets only
# ---------------------------------------------------------------------------------------------


def _enum(*names):
    return SimpleNamespace(**{name: i for i, name in enumerate(names)})


def _cls(name, *attrs, doc=None):
    namespace = dict.fromkeys(attrs)
    namespace["__doc__"] = doc
    return type(name, (), namespace)


_LAYER_TYPES_8 = ("CONVOLUTION", "ELEMENTWISE", "UNARY", "REDUCE", "SHUFFLE", "MATRIX_MULTIPLY", "SOFTMAX",
                  "QUANTIZE", "DEQUANTIZE", "CONSTANT")
_CALIB_DOC_8 = "Extends the IInt8Calibrator class. This is the preferred calibrator."
_CALIB_DOC_10 = "[DEPRECATED] Deprecated in TensorRT 10.1. Superseded by explicit quantization."
_BINDINGS_ENGINE = ("num_bindings", "get_binding_name", "binding_is_input", "get_binding_shape",
                    "get_binding_dtype", "get_profile_shape", "max_batch_size")
_TENSOR_ENGINE = ("num_io_tensors", "get_tensor_name", "get_tensor_mode", "get_tensor_shape", "get_tensor_dtype",
                  "get_tensor_profile_shape")
_COMMON_CONFIG = ("set_flag", "add_optimization_profile", "default_device_type", "DLA_core", "profiling_verbosity",
                  "create_timing_cache", "set_timing_cache", "get_timing_cache")


def fake_trt_8_2():
    """TensorRT 8.2.1 (JetPack 4.6, Jetson TX2/Nano/Xavier)."""
    return SimpleNamespace(
        __version__="8.2.1.8",
        NetworkDefinitionCreationFlag=_enum("EXPLICIT_BATCH", "EXPLICIT_PRECISION"),
        BuilderFlag=_enum("FP16", "INT8", "DEBUG", "GPU_FALLBACK", "STRICT_TYPES", "REFIT", "DISABLE_TIMING_CACHE",
                          "TF32", "SPARSE_WEIGHTS", "SAFETY_SCOPE", "OBEY_PRECISION_CONSTRAINTS",
                          "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO", "REJECT_EMPTY_ALGORITHMS"),
        Builder=_cls("Builder", "max_batch_size", "platform_has_fast_fp16", "platform_has_fast_int8",
                     "num_DLA_cores", "build_engine", "build_serialized_network", "create_network",
                     "create_builder_config", "create_optimization_profile"),
        IBuilderConfig=_cls("IBuilderConfig", "max_workspace_size", "int8_calibrator", "set_calibration_profile",
                            *_COMMON_CONFIG),
        ICudaEngine=_cls("ICudaEngine", "create_execution_context", "create_engine_inspector", *_BINDINGS_ENGINE),
        IExecutionContext=_cls("IExecutionContext", "execute_async_v2", "execute_async", "set_binding_shape",
                               "get_binding_shape"),
        IInt8EntropyCalibrator2=_cls("IInt8EntropyCalibrator2", "get_batch", "get_batch_size", doc=_CALIB_DOC_8),
        ProfilingVerbosity=_enum("LAYER_NAMES_ONLY", "DETAILED", "NONE", "DEFAULT", "VERBOSE"),
        LayerInformationFormat=_enum("ONELINE", "JSON"),
        LayerType=_enum(*_LAYER_TYPES_8),
        DeviceType=_enum("GPU", "DLA"),
        OnnxParser=_cls("OnnxParser", "parse", "parse_from_file", "num_errors", "get_error"),
    )


def fake_trt_8_5():
    """TensorRT 8.5.2 (JetPack 5.1, Xavier/Orin): memory pools and the tensor API arrive."""
    trt = fake_trt_8_2()
    trt.__version__ = "8.5.2.2"
    trt.MemoryPoolType = _enum("WORKSPACE", "DLA_MANAGED_SRAM", "DLA_LOCAL_DRAM", "DLA_GLOBAL_DRAM", "TACTIC_DRAM")
    trt.IBuilderConfig = _cls("IBuilderConfig", "max_workspace_size", "set_memory_pool_limit", "int8_calibrator",
                              "set_calibration_profile", *_COMMON_CONFIG)
    trt.ICudaEngine = _cls("ICudaEngine", "create_execution_context", "create_engine_inspector", *_BINDINGS_ENGINE,
                           *_TENSOR_ENGINE)
    trt.IExecutionContext = _cls("IExecutionContext", "execute_async_v2", "execute_async_v3", "set_binding_shape",
                                 "set_input_shape", "set_tensor_address", "get_tensor_shape")
    return trt


def fake_trt_10_3():
    """TensorRT 10.3 (JetPack 6, Orin; desktop): implicit batch gone, STRONGLY_TYPED added."""
    return SimpleNamespace(
        __version__="10.3.0.30",
        NetworkDefinitionCreationFlag=_enum("EXPLICIT_BATCH", "STRONGLY_TYPED"),
        BuilderFlag=_enum("FP16", "INT8", "DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32",
                          "SPARSE_WEIGHTS", "SAFETY_SCOPE", "OBEY_PRECISION_CONSTRAINTS",
                          "PREFER_PRECISION_CONSTRAINTS",
                          "DIRECT_IO", "REJECT_EMPTY_ALGORITHMS", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "FP8",
                          "ERROR_ON_TIMING_CACHE_MISS", "BF16", "DISABLE_COMPILATION_CACHE", "STRIP_PLAN",
                          "REFIT_IDENTICAL", "WEIGHT_STREAMING"),
        Builder=_cls("Builder", "platform_has_fast_fp16", "platform_has_fast_int8", "num_DLA_cores",
                     "build_serialized_network", "create_network", "create_builder_config",
                     "create_optimization_profile"),
        IBuilderConfig=_cls("IBuilderConfig", "set_memory_pool_limit", "int8_calibrator", "set_calibration_profile",
                            *_COMMON_CONFIG),
        MemoryPoolType=_enum("WORKSPACE", "DLA_MANAGED_SRAM", "DLA_LOCAL_DRAM", "DLA_GLOBAL_DRAM", "TACTIC_DRAM",
                             "TACTIC_SHARED_MEMORY"),
        ICudaEngine=_cls("ICudaEngine", "create_execution_context", "create_engine_inspector", *_TENSOR_ENGINE),
        IExecutionContext=_cls("IExecutionContext", "execute_async_v3", "set_input_shape", "set_tensor_address",
                               "get_tensor_shape"),
        IInt8EntropyCalibrator2=_cls("IInt8EntropyCalibrator2", "get_batch", "get_batch_size", doc=_CALIB_DOC_10),
        ProfilingVerbosity=_enum("LAYER_NAMES_ONLY", "DETAILED", "NONE"),
        LayerInformationFormat=_enum("ONELINE", "JSON"),
        LayerType=_enum(*_LAYER_TYPES_8, "NORMALIZATION"),
        DeviceType=_enum("GPU", "DLA"),
        OnnxParser=_cls("OnnxParser", "parse", "parse_from_file", "num_errors", "get_error"),
    )


def fake_trt_11():
    """TensorRT 11.x: weak typing and implicit INT8 removed; strongly typed always."""
    return SimpleNamespace(
        __version__="11.4.0.5",
        NetworkDefinitionCreationFlag=_enum("STRONGLY_TYPED"),  # deprecated in 11: ignored, always on
        BuilderFlag=_enum("DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32", "SPARSE_WEIGHTS",
                          "SAFETY_SCOPE", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "ERROR_ON_TIMING_CACHE_MISS",
                          "DISABLE_COMPILATION_CACHE", "STRIP_PLAN", "REFIT_IDENTICAL", "WEIGHT_STREAMING",
                          "EDITABLE_TIMING_CACHE"),
        Builder=_cls("Builder", "num_DLA_cores", "build_serialized_network", "create_network",
                     "create_builder_config", "create_optimization_profile"),
        IBuilderConfig=_cls("IBuilderConfig", "set_memory_pool_limit", *_COMMON_CONFIG),
        MemoryPoolType=_enum("WORKSPACE", "TACTIC_SHARED_MEMORY"),
        ICudaEngine=_cls("ICudaEngine", "create_execution_context", "create_engine_inspector", *_TENSOR_ENGINE),
        IExecutionContext=_cls("IExecutionContext", "execute_async_v3", "set_input_shape", "set_tensor_address",
                               "get_tensor_shape"),
        ProfilingVerbosity=_enum("LAYER_NAMES_ONLY", "DETAILED", "NONE"),
        LayerInformationFormat=_enum("ONELINE", "JSON"),
        LayerType=_enum(*_LAYER_TYPES_8, "NORMALIZATION"),
        DeviceType=_enum("GPU", "DLA"),
        OnnxParser=_cls("OnnxParser", "parse", "parse_from_file", "num_errors", "get_error"),
    )


FAKES = {"8.2": fake_trt_8_2, "8.5": fake_trt_8_5, "10.3": fake_trt_10_3, "11": fake_trt_11}

TX2 = {"has_fast_int8": False, "has_fast_fp16": True, "num_dla_cores": 0}
XAVIER = {"has_fast_int8": True, "has_fast_fp16": True, "num_dla_cores": 2}
ORIN = {"has_fast_int8": True, "has_fast_fp16": True, "num_dla_cores": 2}
DESKTOP = {"has_fast_int8": True, "has_fast_fp16": True, "num_dla_cores": 0}
UNKNOWN = {"has_fast_int8": None, "has_fast_fp16": None, "num_dla_cores": 0}


def caps(version):
    return be.detect_api(FAKES[version]())


def args(*extra):
    return be.parse_args(["model.onnx", "--out", "model.engine", *extra])


def plan(version, *extra, platform=None):
    return be.plan_build(args(*extra), caps(version), platform)


# ---------------------------------------------------------------------------------------------
# detect_api
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version, expected", [
    ("8.2", dict(explicit_batch_flag_needed=True, strongly_typed_available=False, strongly_typed_only=False,
                 memory_pool_api=False, legacy_workspace_api=True, implicit_int8_available=True,
                 implicit_int8_deprecated=False, engine_inspector_available=True, detailed_profiling_available=True,
                 precision_constraint_flag="OBEY_PRECISION_CONSTRAINTS", tensor_io_api=False, binding_api=True,
                 normalization_layer=False, platform_query_available=True, dla_available=True)),
    ("8.5", dict(explicit_batch_flag_needed=True, strongly_typed_available=False, memory_pool_api=True,
                 implicit_int8_available=True, implicit_int8_deprecated=False, tensor_io_api=True, binding_api=True,
                 tensor_profile_shape=True, normalization_layer=False)),
    ("10.3", dict(explicit_batch_flag_needed=False, strongly_typed_available=True, strongly_typed_flag=True,
                  strongly_typed_only=False, memory_pool_api=True, legacy_workspace_api=False,
                  implicit_int8_available=True, implicit_int8_deprecated=True, engine_inspector_available=True,
                  precision_constraint_flag="OBEY_PRECISION_CONSTRAINTS", tensor_io_api=True, binding_api=False,
                  normalization_layer=True, platform_query_available=True)),
    ("11", dict(explicit_batch_flag_needed=False, strongly_typed_available=True, strongly_typed_flag=False,
                strongly_typed_only=True, fp16_flag=False, int8_flag=False, memory_pool_api=True,
                implicit_int8_available=False, calibration_profile_available=False, engine_inspector_available=True,
                precision_constraint_flag=None, tensor_io_api=True, binding_api=False, platform_query_available=False)),
])
def test_detect_api(version, expected):
    found = caps(version)
    assert {key: found[key] for key in expected} == expected
    assert found["version"] == FAKES[version]().__version__


def test_detect_api_empty_module_has_no_capabilities():
    found = be.detect_api(SimpleNamespace())
    assert not found["build_serialized_network"] and not found["tensor_io_api"] and not found["binding_api"]


def test_detect_api_deprecation_falls_back_to_version():
    trt = fake_trt_10_3()
    trt.IInt8EntropyCalibrator2 = _cls("IInt8EntropyCalibrator2", "get_batch", doc="calibrator")
    assert be.detect_api(trt)["implicit_int8_deprecated"]  # 10.3 >= 10.1 even with a terse docstring
    trt.__version__ = "10.0.1.6"
    assert not be.detect_api(trt)["implicit_int8_deprecated"]


def test_query_platform_reads_builder_and_handles_trt11():
    builder = SimpleNamespace(platform_has_fast_int8=False, platform_has_fast_fp16=True, num_DLA_cores=0)
    assert be.query_platform(builder, caps("8.2")) == TX2
    builder11 = SimpleNamespace(num_DLA_cores=0)
    assert be.query_platform(builder11, caps("11")) == {"has_fast_int8": None, "has_fast_fp16": None,
                                                        "num_dla_cores": 0}


# ---------------------------------------------------------------------------------------------
# plan_build
# ---------------------------------------------------------------------------------------------


def test_plan_tx2_int8_falls_back_to_fp16_with_one_warning():
    p = plan("8.2", "--precision", "int8", platform=TX2)
    assert p.precision == "fp16" and p.builder_flags == ["FP16"]
    assert p.network_flags == ["EXPLICIT_BATCH"]
    assert len(p.warnings) == 1 and "no fast INT8" in p.warnings[0] and "\n" not in p.warnings[0]
    # 8.2 has only max_workspace_size, whose default is too small: we set 1 GiB.
    assert (p.workspace_api, p.workspace_bytes) == ("max_workspace_size", be.LEGACY_DEFAULT_WORKSPACE_MIB * be.MIB)


def test_plan_tx2_drops_the_calibrator_too():
    p = plan("8.2", "--trt-calibrator", "entropy", "--calib", "c.npy", platform=TX2)
    assert p.precision == "fp16" and not p.use_calibrator and "calibration skipped" in p.warnings[0]


def test_plan_xavier_int8_dla():
    p = plan("8.5", "--dla", "1", "--min-batch", "4", "--max-batch", "4", platform=XAVIER)
    assert p.precision == "int8" and p.dla_core == 1
    assert p.builder_flags == ["INT8", "FP16", "GPU_FALLBACK"]
    assert p.warnings == [] and p.batch == (4, 4, 4)
    assert p.workspace_api is None  # 8.5 has memory pools, whose default is the device memory


def test_plan_dla_rejections():
    with pytest.raises(be.UsageError, match="2 DLA core"):
        plan("8.5", "--dla", "2", platform=XAVIER)
    with pytest.raises(be.UsageError, match="FP16 and INT8 only"):
        plan("8.5", "--dla", "0", "--precision", "fp32", platform=XAVIER)
    assert any("dynamic shapes" in w for w in plan("8.5", "--dla", "0", platform=XAVIER).warnings)


def test_plan_orin_layernorm_fp32():
    p = plan("10.3", "--layernorm-fp32", "--workspace", "2048", platform=ORIN)
    assert p.builder_flags == ["INT8", "FP16", "OBEY_PRECISION_CONSTRAINTS"] and p.pin_layernorm_fp32
    assert p.network_flags == []  # EXPLICIT_BATCH is deprecated (and implicit) in 10.x
    assert (p.workspace_api, p.workspace_bytes) == ("memory_pool", 2048 * be.MIB)
    assert p.detailed_profiling and p.warnings == []


def test_plan_layernorm_uses_strict_types_before_8_2():
    trt = fake_trt_8_2()
    del trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS  # as in 8.0
    p = be.plan_build(args("--precision", "fp16", "--layernorm-fp32"), be.detect_api(trt), XAVIER)
    assert p.builder_flags == ["FP16", "STRICT_TYPES"] and p.pin_layernorm_fp32


def test_plan_layernorm_is_a_noop_in_fp32():
    p = plan("10.3", "--precision", "fp32", "--layernorm-fp32", platform=ORIN)
    assert p.builder_flags == [] and not p.pin_layernorm_fp32


def test_plan_desktop_strongly_typed():
    p = plan("10.3", "--strongly-typed", "--layernorm-fp32", platform=DESKTOP)
    assert p.strongly_typed and p.precision == "strongly-typed"
    assert p.network_flags == ["STRONGLY_TYPED"] and p.builder_flags == []
    assert not p.pin_layernorm_fp32 and "keeps the ONNX's types" in p.warnings[0]


def test_plan_strongly_typed_needs_trt10():
    with pytest.raises(be.UsageError, match="TensorRT 10 or newer"):
        plan("8.5", "--strongly-typed", platform=XAVIER)


def test_plan_trt11_is_always_strongly_typed():
    p = plan("11", platform=UNKNOWN)
    assert p.strongly_typed and p.builder_flags == [] and p.network_flags == [] and p.warnings == []
    p = plan("11", "--precision", "fp16", platform=UNKNOWN)
    assert len(p.warnings) == 1 and "strongly typed networks only" in p.warnings[0]


def test_plan_entropy_calibrator():
    p = plan("8.5", "--trt-calibrator", "entropy", "--calib", "c.npy", "--calib-cache", "c.cache", platform=XAVIER)
    assert p.use_calibrator and p.precision == "int8" and p.warnings == []
    p = plan("10.3", "--trt-calibrator", "entropy", "--calib", "c.npy", platform=ORIN)
    assert p.use_calibrator and len(p.warnings) == 1 and "deprecated since TensorRT 10.1" in p.warnings[0]


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


def test_plan_refuses_trt_without_build_serialized_network():
    trt = fake_trt_8_2()
    trt.Builder = _cls("Builder", "build_engine", "max_batch_size")  # TensorRT 7
    with pytest.raises(be.UsageError, match="too old"):
        be.plan_build(args(), be.detect_api(trt), {})


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


def test_format_parser_error_names_the_node():
    trt86 = SimpleNamespace(node=lambda: 12, node_name=lambda: "/blocks.0/attn/MatMul",
                            node_operator=lambda: "MatMul", desc=lambda: "Assertion failed: inputs.size() == 2")
    assert be.format_parser_error(trt86) == ("node 12 '/blocks.0/attn/MatMul' (MatMul): "
                                             "Assertion failed: inputs.size() == 2")
    trt82 = SimpleNamespace(node=lambda: 3, desc=lambda: "Unsupported ONNX data type: UINT8 (2)")
    assert be.format_parser_error(trt82) == "node 3: Unsupported ONNX data type: UINT8 (2)"
    assert be.format_parser_error(SimpleNamespace(node=lambda: -1, desc=lambda: "bad")) == "model: bad"


def test_calibration_batch_size():
    assert be.calibration_batch_size(100, None, (1, 4, 8)) == 4
    assert be.calibration_batch_size(3, None, (1, 4, 8)) == 3
    assert be.calibration_batch_size(100, 1, (1, 4, 8)) == 1  # static batch wins
    with pytest.raises(be.UsageError, match="fewer than one calibration batch"):
        be.calibration_batch_size(2, None, (4, 4, 8))


def test_load_calibration_array(tmp_path):
    good = tmp_path / "calib.npy"
    np.save(good, np.zeros((5, 3, 16, 16), np.float32))
    assert be.load_calibration_array(str(good), [3, 16, 16]).shape == (5, 3, 16, 16)
    with pytest.raises(be.UsageError, match="network input takes"):
        be.load_calibration_array(str(good), [3, 32, 32])
    wrong = tmp_path / "uint8.npy"
    np.save(wrong, np.zeros((5, 3, 16, 16), np.uint8))
    with pytest.raises(be.UsageError, match="float32"):
        be.load_calibration_array(str(wrong))
    flat = tmp_path / "flat.npy"
    np.save(flat, np.zeros((5, 16), np.float32))
    with pytest.raises(be.UsageError, match="N x C x H x W"):
        be.load_calibration_array(str(flat))


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
    assert "--trt-calibrator" in result.stdout and "--layernorm-fp32" in result.stdout


@pytest.mark.parametrize("script", [SCRIPT, LAUNCHER], ids=["vitdeploy/trt", "jetson"])
def test_build_without_tensorrt_exits_2_with_one_line(script, tmp_path):
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"\x08\x08")  # never read: TensorRT is missing first
    result = _run_without_trt(script, onnx_file, "--out", tmp_path / "model.engine", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "TensorRT not found" in lines[0] and "built on the device" in lines[0]
    assert not (tmp_path / "model.engine").exists()


def test_missing_onnx_exits_2_with_one_line(tmp_path):
    result = _run_without_trt(SCRIPT, tmp_path / "nope.onnx", "--out", tmp_path / "m.engine")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: ONNX model not found: {tmp_path / 'nope.onnx'}"]


def test_launcher_in_a_bundle(tmp_path):
    """A bundle: the launcher under another name next to build_engine.py and device.py; or without
    them (one-line errors)."""
    shutil.copy(LAUNCHER, tmp_path / "build.py")
    shutil.copy(LAUNCHER.parent / "_launch.py", tmp_path / "_launch.py")
    alone = _run_without_trt(tmp_path / "build.py", "--help")
    assert alone.returncode == 2 and "build_engine.py not found" in alone.stderr
    shutil.copy(SCRIPT, tmp_path / "build_engine.py")
    no_device = _run_without_trt(tmp_path / "build.py", "--help")
    assert no_device.returncode == 2 and no_device.stderr.count("\n") == 1 and "device.py" in no_device.stderr
    shutil.copy(DEVICE, tmp_path / "device.py")
    assert _run_without_trt(tmp_path / "build.py", "--help").returncode == 0


def test_script_copied_with_device_py_runs_anywhere(tmp_path):
    """build_engine.py + device.py copied into any folder: --help, run from another directory; without
    device.py, one line and exit 2."""
    folder = tmp_path / "somewhere"
    folder.mkdir()
    shutil.copy(SCRIPT, folder / "build_engine.py")
    alone = _run_without_trt(folder / "build_engine.py", "--help", cwd=tmp_path)
    assert alone.returncode == 2 and alone.stderr.count("\n") == 1 and "device.py next to it" in alone.stderr
    shutil.copy(DEVICE, folder / "device.py")
    result = _run_without_trt(folder / "build_engine.py", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--trt-calibrator" in result.stdout


def test_package_and_script_share_device_py():
    """Imported as vitdeploy.trt.build_engine, the script re-exports the package's own device module."""
    from vitdeploy.trt import device

    assert be._device is device
    for name in ("UsageError", "TensorRTNotFound", "CudaNotFound", "load_cuda", "query_device", "engine_io",
                 "get_trt_logger"):
        assert getattr(be, name) is getattr(device, name), name
    assert issubclass(be.TensorRTNotFound, be.UsageError) and issubclass(be.CudaNotFound, be.UsageError)


def _fstrings(source):
    """Source text of every f-string (from the AST, so docstrings that mention them don't count)."""
    return [ast.get_source_segment(source, node) for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.JoinedStr)]


@pytest.mark.parametrize("path", [SCRIPT, DEVICE, LAUNCHER], ids=["vitdeploy/trt", "device.py", "jetson"])
def test_scripts_stay_python36_and_standalone(path):
    """JetPack 4.6 ships Python 3.6; the deploy bundle has no vitdeploy package. (device.py is loaded by
    path with importlib, not imported by name, so it is not an import here.)"""
    source = path.read_text()
    tree = ast.parse(source, feature_version=(3, 6))  # rejects walrus, positional-only params, ...
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.module != "__future__", "from __future__ imports: annotations needs 3.7"
            imported.add((node.module or "").split(".")[0])
    allowed = {"_launch", "argparse", "datetime", "json", "os", "re", "sys", "tempfile", "warnings", "importlib",
               "numpy", "tensorrt", "cuda", "pycuda"}
    assert imported <= allowed, imported - allowed
    for fstring in _fstrings(source):
        assert not re.search(r"\{[^{}\s]+=(![rsa])?(:[^{}]*)?\}", fstring), f"'=' specifier needs 3.8: {fstring}"


def test_script_module_imports_without_tensorrt_or_numpy():
    """--help must not need numpy or tensorrt: both are imported inside functions."""
    code = ("import sys; sys.modules['tensorrt'] = None; sys.modules['numpy'] = None; "
            "sys.argv = ['build_engine.py', '--help']; import runpy; "
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# Engine metadata and portability (vitdeploy.runtime)
# ---------------------------------------------------------------------------------------------

from vitdeploy.runtime import (  # noqa: E402  (grouped with the tests that use them)
    TrtRunner, check_engine_compatible, engine_metadata_path, load_engine_metadata, validate_engine_metadata)


def good_meta(**overrides):
    """Metadata exactly as build_engine.make_metadata writes it (writer and validator agree)."""
    p = be.plan_build(args("--layernorm-fp32"), caps("10.3"), ORIN)
    meta = be.make_metadata(
        "model.engine", "10.3.0.30", "Orin", (8, 7), p,
        inputs=[{"name": "input", "shape": [-1, 3, 224, 224], "dtype": "float32"}],
        outputs=[{"name": "logits", "shape": [-1, 1000], "dtype": "float32"}],
        onnx_file="/tmp/model.onnx", layers=[{"name": "gemm", "type": "CaskGemm", "precision": "int8"}],
        pinned_layers=["/blocks.0/norm1/LayerNorm"], batch_profile={"min": 1, "opt": 1, "max": 8},
        preprocessing={"mean": [0.5] * 3, "std": [0.5] * 3, "input_size": [3, 224, 224]})
    meta.update(overrides)
    return meta


def test_good_metadata_validates_and_round_trips(tmp_path):
    meta = good_meta()
    assert validate_engine_metadata(meta) is meta
    assert meta["precision"]["builder_flags"] == ["INT8", "FP16", "OBEY_PRECISION_CONSTRAINTS"]
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


def test_query_device_never_raises():
    """No GPU here: (None, None); on a GPU machine a name and (major, minor)."""
    name, cc = be.query_device()
    assert (name is None and cc is None) or (isinstance(name, str) and len(cc) == 2)


# ---------------------------------------------------------------------------------------------
# device.py: the plumbing build_engine.py, benchmark.py and TrtRunner share (fakes, no GPU)
# ---------------------------------------------------------------------------------------------


class _FakeContext:
    """Records what the engine-running helpers ask of an execution context."""

    def __init__(self, tensor_api):
        self.calls = []
        if tensor_api:
            self.set_tensor_address = lambda name, ptr: self.calls.append(("address", name, ptr))
            self.execute_async_v3 = lambda handle: self.calls.append(("v3", handle)) or True
            self.set_input_shape = lambda name, shape: self.calls.append(("shape", name, shape)) or True
            self.get_tensor_shape = lambda name: [2, 8]
        else:
            self.execute_async_v2 = lambda bindings, handle: self.calls.append(("v2", bindings, handle)) or True
            self.set_binding_shape = lambda index, shape: self.calls.append(("shape", index, shape)) or False
            self.get_binding_shape = lambda index: [-1, 8]


@pytest.mark.parametrize("tensor_api", [True, False], ids=["tensor-api", "bindings"])
def test_device_runs_an_engine_with_either_api(tensor_api):
    from vitdeploy.trt import device

    io = [{"name": "input", "index": 1, "is_input": True, "shape": [-1, 16]},
          {"name": "logits", "index": 0, "is_input": False, "shape": [-1, 8]}]
    engine = SimpleNamespace(num_bindings=2, get_tensor_profile_shape=lambda name, p: ((1, 16), (2, 16), (8, 16)),
                             get_profile_shape=lambda p, index: ((1, 16), (4, 16), (4, 16)))
    if tensor_api:
        engine.num_io_tensors = 2
    context = _FakeContext(tensor_api)
    assert device.uses_tensor_api(engine, context) is tensor_api
    assert device.profile_range(engine, io[0], tensor_api) == (((1, 16), (8, 16)) if tensor_api else
                                                               ((1, 16), (4, 16)))
    assert device.profile_range(engine, dict(io[0], shape=[3, 16]), tensor_api) == ((3, 16), (3, 16))
    assert device.set_input_shape(context, io[0], [2, 16], tensor_api) is tensor_api
    assert device.output_shape(context, io[1], tensor_api) == ((2, 8) if tensor_api else (-1, 8))
    bindings = device.bind(engine, context, io, {"input": 100, "logits": 200}, tensor_api)
    assert device.enqueue(context, bindings, 7, tensor_api)
    if tensor_api:
        assert bindings is None
        assert context.calls[-3:] == [("address", "input", 100), ("address", "logits", 200), ("v3", 7)]
    else:
        assert context.calls[-1] == ("v2", [200, 100], 7)  # bindings ordered by binding index


def test_device_buffers_grow_and_writes_are_atomic(tmp_path):
    from vitdeploy.trt import device

    cuda = SimpleNamespace(allocated=[], freed=[])
    cuda.malloc = lambda n: cuda.allocated.append(n) or len(cuda.allocated)
    cuda.free = cuda.freed.append
    buffers = {}
    assert device.ensure_buffer(cuda, buffers, "x", 0) == 1  # never a zero-byte allocation
    assert device.ensure_buffer(cuda, buffers, "x", 64) == 2 and cuda.freed == [1]
    assert device.ensure_buffer(cuda, buffers, "x", 32) == 2 and buffers == {"x": (2, 64)}  # never shrinks
    device.write_atomic(str(tmp_path / "a.json"), "{\"é\": 1}\n")
    device.write_atomic(str(tmp_path / "b.bin"), b"\x00\x01")
    assert (tmp_path / "a.json").read_text(encoding="utf-8") == "{\"é\": 1}\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin"]  # no temporary files left
    assert device.version_tuple("10.3.0.26") == (10, 3, 0, 26) and device.version_tuple("unknown") == ()

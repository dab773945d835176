"""What a cpu build writes: calib.cache named after the ONNX tensors, and consistent with the Q/DQ scales."""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from vitdeploy.calib_cache import read_calib_cache
from vitdeploy.cli import main


def test_calib_cache_matches_the_qdq_scales(tiny_vit, calib_npz, tmp_path):
    out = tmp_path / "out"
    assert main(["build", str(tiny_vit.state_dict), "--arch", tiny_vit.arch, "--model-kwargs", tiny_vit.kwargs,
                 "--calib", str(calib_npz), "--calib-size", "8", "--out", str(out), "--quiet"]) == 0
    header, amax = read_calib_cache(out / "calib.cache")
    assert header.startswith("TRT-") and header.endswith("-EntropyCalibration2")
    model = onnx.load(str(out / "model.int8.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    activation_q = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    expected = {n.input[0]: float(inits[n.input[1]]) * 127.0 for n in activation_q}
    assert set(amax) == set(expected)          # one line per quantized tensor, named as in the ONNX
    for name, value in expected.items():
        assert np.isclose(amax[name], value, rtol=1e-6), name
    record = json.loads((out / "build.json").read_text())
    assert "calib.cache" in record["files"]


def test_engine_options_reach_the_engine_command():
    from vitdeploy.artifacts import ModelSpec
    from vitdeploy.pipeline import BuildConfig, engine_argv
    from vitdeploy.targets import get_target

    spec = ModelSpec(name="m", input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, num_classes=10)
    cfg = BuildConfig(model="m.pt", workspace_mib=2048, dla_core=0)
    argv = engine_argv(get_target("jetson-xavier"), spec, cfg)
    assert argv[0] == "model.int8.onnx" and argv[argv.index("--workspace") + 1] == "2048"
    assert argv[argv.index("--dla") + 1] == "0" and argv[argv.index("--max-batch") + 1] == "1"  # DLA: static batch 1
    implicit = engine_argv(get_target("jetson-orin"), spec, BuildConfig(model="m.pt", trt_calibrator="entropy"))
    assert implicit[0] == "model.fp32.onnx"        # implicit INT8 calibrates the FP32 network itself
    assert implicit[implicit.index("--calib") + 1] == "calib.npy"
    # TensorRT's entropy calibration must run: its cache is its own file, never our max-calibrated calib.cache
    # (a non-empty cache is read back instead of calibrating).
    assert implicit[implicit.index("--calib-cache") + 1] == "entropy.cache" and "calib.cache" not in implicit
    tx2 = engine_argv(get_target("jetson-tx2"), spec, BuildConfig(model="m.pt"))
    assert tx2[0] == "model.fp32.onnx" and tx2[tx2.index("--precision") + 1] == "fp16"


def test_engine_option_errors(tiny_vit, calib_npz, tmp_path, capsys):
    base = ["build", str(tiny_vit.state_dict), "--arch", tiny_vit.arch, "--model-kwargs", tiny_vit.kwargs,
            "--calib", str(calib_npz), "--out", str(tmp_path / "o"), "--quiet"]
    assert main(base + ["--target", "desktop", "--dla", "0"]) == 2
    assert "has no DLA" in capsys.readouterr().err
    assert main(base + ["--target", "cpu", "--trt-calibrator", "entropy"]) == 2
    assert "TensorRT option" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_verification_bars_come_from_the_command_line(tiny_vit, calib_npz, tmp_path, capsys):
    base = ["build", str(tiny_vit.state_dict), "--arch", tiny_vit.arch, "--model-kwargs", tiny_vit.kwargs,
            "--calib", str(calib_npz), "--calib-size", "8", "--quiet"]
    # A cosine above 1 cannot be reached: the build must fail in one line and leave nothing behind.
    assert main(base + ["--out", str(tmp_path / "fails"), "--verify-min-cosine", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "does not reproduce PyTorch" in err and "bars 99 %, 1.5" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "fails").exists()
    assert main(base + ["--out", str(tmp_path / "ok"), "--verify-min-agreement", "90"]) == 0
    verification = json.loads((tmp_path / "ok" / "build.json").read_text())["verification"]
    assert verification["bars"] == {"agreement": 90.0, "cosine": 0.999}


def test_near_tie_hint_only_when_the_logits_are_near_ties():
    from vitdeploy.measure.evaluate import Predictions
    from vitdeploy.pipeline import _near_tie_hint

    rng = np.random.default_rng(0)
    untrained = rng.normal(0, 0.01, size=(64, 10)).astype(np.float32)        # margins ~0.005
    noise = rng.normal(0, 0.003, size=untrained.shape).astype(np.float32)
    hint = _near_tie_hint(Predictions(untrained, None), Predictions(untrained + noise, None))
    assert "close to ties" in hint and "--verify-min-cosine" in hint
    trained = untrained.copy()
    trained[np.arange(64), rng.integers(0, 10, 64)] += 5.0                   # one clear winner per image
    assert _near_tie_hint(Predictions(trained, None), Predictions(trained + noise, None)) == ""


def test_near_tie_flips_are_told_apart_from_real_mismatches():
    """A flip where the logits moved by ≤ 1 % of their spread is rounding on a near tie; more is a mismatch."""
    from vitdeploy.measure.evaluate import Predictions, near_tie_flips

    logits = np.array([[5.0, 5.02, 0.0, -1.0],     # top two 0.02 apart: a near tie
                       [5.0, 1.0, 0.0, -1.0]], np.float32)
    nudged = logits.copy()
    nudged[0, 0] += 0.03                             # 0.5 % of the spread 6.02: flips image 0
    assert near_tie_flips(Predictions(logits, None), Predictions(nudged, None)) == 1
    broken = logits.copy()
    broken[1, 1] += 4.5                              # 75 % of the spread: a real mismatch
    assert near_tie_flips(Predictions(logits, None), Predictions(broken, None)) == 0
    both = nudged.copy()
    both[1, 1] += 4.5
    assert near_tie_flips(Predictions(logits, None), Predictions(both, None)) == 1


def _noisy(base, scale, seed):
    from vitdeploy.measure.evaluate import Predictions

    return Predictions(base + np.random.default_rng(seed).normal(0, scale, base.shape).astype(np.float32), None)


def test_int8_file_that_diverges_image_by_image_but_is_as_accurate_passes_on_statistics():
    """Two equally noisy INT8 runs (independent rounding, as PyTorch and ONNX Runtime give on a deep
    ViT) agree poorly with each other, but each is as close to its FP32: verification passes, and says so."""
    from vitdeploy.measure.evaluate import Predictions
    from vitdeploy.pipeline import BuildConfig, _compare_or_statistics

    fp32 = np.random.default_rng(0).normal(0, 3, (2000, 50)).astype(np.float32)
    ref, other = (Predictions(fp32, None), _noisy(fp32, 0.5, 1)), (Predictions(fp32, None), _noisy(fp32, 0.5, 2))
    record = _compare_or_statistics(ref, other, BuildConfig(model=Path("m.pt")), True, "x does not reproduce y",
                                    ("PyTorch", "ONNX Runtime"))
    assert record["mode"] == "statistics" and record["agreement"] < 99
    stats = record["statistics"]
    assert abs(stats["PyTorch"]["agreement_with_fp32"] - stats["ONNX Runtime"]["agreement_with_fp32"]) <= 3


def test_int8_file_that_is_less_accurate_fails_verification():
    """A file twice as noisy (what a wrong scale does) fails, and the message gives both accuracies."""
    from vitdeploy.errors import ExportError
    from vitdeploy.measure.evaluate import Predictions
    from vitdeploy.pipeline import BuildConfig, _compare_or_statistics

    fp32 = np.random.default_rng(0).normal(0, 3, (2000, 50)).astype(np.float32)
    ref, worse = (Predictions(fp32, None), _noisy(fp32, 0.5, 1)), (Predictions(fp32, None), _noisy(fp32, 1.0, 2))
    with pytest.raises(ExportError, match="not as accurate either: PyTorch agrees with its FP32 on"):
        _compare_or_statistics(ref, worse, BuildConfig(model=Path("m.pt")), True, "x does not reproduce y",
                               ("PyTorch", "ONNX Runtime"))

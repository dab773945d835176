"""Tests for vitdeploy.calib_cache: the TensorRT calibration cache format."""

import struct

import numpy as np
import pytest

from vitdeploy.calib_cache import (
    DEFAULT_TRT_VERSION,
    hex_to_scale,
    read_calib_cache,
    scale_to_hex,
    write_calib_cache,
)
from vitdeploy.errors import InputError


def test_known_hex_values():
    assert scale_to_hex(1.0) == "3f800000"
    assert scale_to_hex(2.0) == "40000000"
    assert scale_to_hex(np.float32(0.5)) == "3f000000"
    assert hex_to_scale("3f800000") == 1.0
    assert hex_to_scale("3C010A14") == struct.unpack(">f", bytes.fromhex("3c010a14"))[0]
    assert hex_to_scale("800000") == 2.0**-126  # leading zeros may be omitted


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf"), 1e-50, 1e40])
def test_scale_to_hex_rejects_unusable_scales(scale):
    with pytest.raises(InputError):
        scale_to_hex(scale)


@pytest.mark.parametrize("text", ["", "xyz", "3f8000001", "0x3f8000"])
def test_hex_to_scale_rejects_garbage(text):
    with pytest.raises(InputError):
        hex_to_scale(text)


def test_round_trip_is_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    amaxes = {f"/blocks.{i}/attn/qkv/MatMul_output_0": float(a) for i, a in enumerate(rng.uniform(1e-3, 50, 40))}
    amaxes["input"] = 2.640625
    path = tmp_path / "calib.cache"
    write_calib_cache(path, amaxes)
    header, read_back = read_calib_cache(path)
    assert header == f"TRT-{DEFAULT_TRT_VERSION}-EntropyCalibration2"
    assert list(read_back) == list(amaxes)  # order kept
    for name, amax in amaxes.items():
        expected_scale = np.float32(amax / 127)
        assert read_back[name] == float(expected_scale) * 127
        assert np.float32(read_back[name] / 127) == expected_scale  # same float32 bits
    # Writing what we read reproduces the file byte for byte.
    again = tmp_path / "again.cache"
    write_calib_cache(again, read_back)
    assert again.read_bytes() == path.read_bytes()


def test_file_layout(tmp_path):
    path = tmp_path / "calib.cache"
    write_calib_cache(path, {"input": 127.0, "out": 254.0}, trt_version=100300, algorithm="EntropyCalibration2")
    assert path.read_text() == "TRT-100300-EntropyCalibration2\ninput: 3f800000\nout: 40000000\n"
    assert [p.name for p in tmp_path.iterdir()] == ["calib.cache"]  # no temporary left behind


def test_names_with_colons_round_trip(tmp_path):
    amaxes = {"a:b": 1.0, "x: y": 2.0, "ends:": 3.0, "(Unnamed Layer* 3) [Shuffle]_output": 4.0, "t:0": 5.0}
    path = tmp_path / "calib.cache"
    write_calib_cache(path, amaxes)
    _, read_back = read_calib_cache(path)
    assert list(read_back) == list(amaxes)
    for name, amax in amaxes.items():
        assert read_back[name] == pytest.approx(amax, rel=1e-7)


def test_reads_a_tensorrt_written_cache(tmp_path):
    path = tmp_path / "trt.cache"
    path.write_text("TRT-8601-EntropyCalibration2\r\ninput: 3c010a14\r\n/stem/Conv_output_0: 3d8e3b4e\r\n\r\n")
    header, amaxes = read_calib_cache(path)
    assert header == "TRT-8601-EntropyCalibration2"
    assert amaxes["input"] == pytest.approx(hex_to_scale("3c010a14") * 127)
    assert set(amaxes) == {"input", "/stem/Conv_output_0"}


@pytest.mark.parametrize("amax", [0.0, -1.0, float("nan"), float("inf"), "big"])
def test_write_rejects_bad_amax_naming_the_tensor(tmp_path, amax):
    path = tmp_path / "calib.cache"
    with pytest.raises(InputError, match="bad/tensor"):
        write_calib_cache(path, {"good": 1.0, "bad/tensor": amax})
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs", [dict(trt_version=0), dict(trt_version="8601"), dict(algorithm=""), dict(algorithm="Entropy 2")]
)
def test_write_rejects_bad_header_fields(tmp_path, kwargs):
    with pytest.raises(InputError):
        write_calib_cache(tmp_path / "c.cache", {"x": 1.0}, **kwargs)


def test_write_rejects_names_with_line_breaks(tmp_path):
    with pytest.raises(InputError, match="line break"):
        write_calib_cache(tmp_path / "c.cache", {"a\nb": 1.0})


def test_write_into_missing_folder_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot write"):
        write_calib_cache(tmp_path / "missing" / "c.cache", {"x": 1.0})


@pytest.mark.parametrize(
    "text,line",
    [
        ("", 1),
        ("not a header\ninput: 3f800000\n", 1),
        ("TRT-8601-EntropyCalibration2\ninput 3f800000\n", 2),
        ("TRT-8601-EntropyCalibration2\ninput: 3f800000\nother: zzzz\n", 3),
        ("TRT-8601-EntropyCalibration2\ninput: 3f800000\n: 3f800000\n", 3),
        ("TRT-8601-EntropyCalibration2\ninput: 00000000\n", 2),  # zero scale
        ("TRT-8601-EntropyCalibration2\ninput: bf800000\n", 2),  # negative scale
        ("TRT-8601-EntropyCalibration2\ninput: 7f800000\n", 2),  # inf
        ("TRT-8601-EntropyCalibration2\ninput: 3f800000\ninput: 3f800000\n", 3),  # duplicate
    ],
)
def test_malformed_files_name_the_line(tmp_path, text, line):
    path = tmp_path / "bad.cache"
    path.write_text(text)
    with pytest.raises(InputError, match=f"{path.name}:{line}"):
        read_calib_cache(path)


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        read_calib_cache(tmp_path / "nope.cache")

"""The target registry: names, aliases, and the per-target facts other modules rely on."""

import dataclasses

import pytest

from vitdeploy.errors import InputError
from vitdeploy.targets import Target, format_targets_table, get_target, list_targets, target_rows

CANONICAL = ["jetson-tx2", "jetson-xavier", "jetson-orin", "desktop", "cpu"]


def test_all_targets_registered_in_order():
    assert [t.name for t in list_targets()] == CANONICAL


def test_jetson_alias_resolves_to_orin():
    assert get_target("jetson") is get_target("jetson-orin")


def test_lookup_is_forgiving_about_case_and_underscores():
    assert get_target(" Jetson_Orin ").name == "jetson-orin"


def test_target_instance_passes_through():
    orin = get_target("jetson-orin")
    assert get_target(orin) is orin


def test_unknown_target_lists_valid_names():
    with pytest.raises(InputError) as info:
        get_target("jetson-nano")
    message = str(info.value)
    assert "jetson-nano" in message
    for name in CANONICAL + ["jetson"]:
        assert name in message


def test_tx2_has_no_int8_and_warns():
    tx2 = get_target("jetson-tx2")
    assert tx2.int8 is False
    assert tx2.fp16 is True
    assert tx2.qdq_placement is None
    assert tx2.warning and "FP16" in tx2.warning
    assert tx2.sm == "sm_62"


@pytest.mark.parametrize("name, trt, sm", [
    ("jetson-xavier", "8.5", (7, 2)),
    ("jetson-orin", "10.3", (8, 7)),
])
def test_jetson_int8_targets(name, trt, sm):
    target = get_target(name)
    assert (target.int8, target.dla, target.strongly_typed) == (True, True, False)
    assert target.trt_version == trt
    assert target.compute_capability == sm
    assert target.qdq_placement == "tensorrt"


def test_only_orin_pins_layernorm_to_fp32():
    assert [t.name for t in list_targets() if t.layernorm_fp32] == ["jetson-orin"]


def test_desktop_is_strongly_typed_tensorrt():
    desktop = get_target("desktop")
    assert desktop.strongly_typed and desktop.int8 and desktop.is_tensorrt
    assert desktop.trt_major_versions == (10, 11)


def test_cpu_uses_onnxruntime_placement():
    cpu = get_target("cpu")
    assert cpu.backend == "onnxruntime" and not cpu.is_tensorrt
    assert cpu.qdq_placement == "onnxruntime"
    assert cpu.trt_version is None


def test_every_target_needs_opset_17():
    assert {t.min_opset for t in list_targets()} == {17}


def test_targets_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_target("cpu").int8 = False  # type: ignore[misc]


def test_table_lists_every_target_alias_and_tx2_warning():
    table = format_targets_table()
    for name in CANONICAL:
        assert name in table
    assert "jetson -> jetson-orin" in table
    assert "no fast INT8" in table
    assert len(target_rows()) == len(CANONICAL)
    assert all(isinstance(t, Target) for t in list_targets())

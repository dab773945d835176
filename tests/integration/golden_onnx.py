"""The ONNX files of a default build, summarised for a golden comparison: node types and counts, and
the predictions (Q/DQ evaluated in float, so on any host) on a fixed image set.

Refactors of the export (issue 16: Q/DQ from the quantizers themselves) must leave these alone.
When a change is *meant* to alter the default graph, regenerate the golden file on purpose:

    VITDEPLOY_UPDATE_GOLDEN=1 python -m pytest tests/integration/test_targets_real.py -k golden
"""
from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).parent / "golden" / "cifar10_vit_default_onnx.json"
#: Argmax flips allowed per file: CPUs of another family sum in another order (AVX2 vs AVX-512), so a
#: calibration max can differ in its last bit and move a near-tie image; a refactor that changes the
#: graph changes far more.
MAX_FLIPS = 2


def summarize(onnx_path: Path, images: np.ndarray) -> dict:
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    ops = collections.Counter(node.op_type for node in model.graph.node)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    predictions = np.concatenate([session.run(None, {name: images[i:i + 128]})[0].argmax(1)
                                  for i in range(0, len(images), 128)])
    return {"ops": dict(sorted(ops.items())), "nodes": len(model.graph.node), "predictions": predictions.tolist()}


def check(key: str, summary: dict) -> None:
    """Compare with (or, with VITDEPLOY_UPDATE_GOLDEN=1, write) the golden entry ``key``."""
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    if os.environ.get("VITDEPLOY_UPDATE_GOLDEN") == "1":
        golden[key] = summary
        lines = [f"{json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in sorted(golden.items())]
        GOLDEN.write_text("{\n" + ",\n".join(lines) + "\n}\n")   # one line per file: readable diffs
        return
    assert key in golden, f"no golden entry {key!r} in {GOLDEN} (regenerate it: see golden_onnx.py)"
    expected = golden[key]
    assert summary["ops"] == expected["ops"] and summary["nodes"] == expected["nodes"], \
        f"{key}: node types changed: {summary['ops']} != {expected['ops']}"
    flips = int((np.array(summary["predictions"]) != np.array(expected["predictions"])).sum())
    assert len(summary["predictions"]) == len(expected["predictions"]) and flips <= MAX_FLIPS, \
        f"{key}: {flips} of {len(expected['predictions'])} predictions changed"

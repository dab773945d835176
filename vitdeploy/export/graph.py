"""Small ONNX graph helpers the export passes (qdq.py, ort_placement.py) share."""
from __future__ import annotations

from typing import Iterable

import onnx


def drop_unused_initializers(graph: onnx.GraphProto, candidates: Iterable[str]) -> None:
    """Remove the initializers in ``candidates`` that no node and no graph output reads any more."""
    candidates = set(candidates)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name not in candidates or i.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)

"""The one small graph layer the ONNX passes share (Q/DQ insertion, ONNX Runtime placement, FP16, lint).

`GraphIndex` answers what every pass asks of a graph -- the initializers, who writes and who reads
each tensor, constant values, inferred shapes, names nobody uses yet -- and makes the two edits they
all make: add an initializer, drop the ones nothing reads any more. The index describes the graph as
it was built; a pass that rewires nodes builds a new one.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import onnx
from onnx import numpy_helper

Shape = Tuple[Optional[int], ...]


def attr(node: onnx.NodeProto, name: str, default=None):
    """An attribute's Python value, or ``default`` when absent."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class GraphIndex:
    """Lookups over the top-level graph of a model (or a bare GraphProto); see the module docstring."""

    def __init__(self, model: Union[onnx.ModelProto, onnx.GraphProto], base_dir: Optional[Path] = None) -> None:
        self.model = model if isinstance(model, onnx.ModelProto) else None
        self.graph = model.graph if self.model is not None else model
        self.base_dir = base_dir    # where external tensor data lives (lint of a file on disk)
        self.nodes: List[onnx.NodeProto] = list(self.graph.node)
        self.inits: Dict[str, onnx.TensorProto] = {t.name: t for t in self.graph.initializer}
        self.outputs = {o.name for o in self.graph.output}
        self._producer: Dict[str, onnx.NodeProto] = {}
        self._consumers: Dict[str, List[Tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for node in self.nodes:
            for out in node.output:
                if out:
                    self._producer[out] = node
            for index, name in enumerate(node.input):
                if name:
                    self._consumers[name].append((node, index))
        self._names: Optional[set] = None
        self._shapes: Optional[Dict[str, Shape]] = None

    # -- reading -------------------------------------------------------------------------------
    def producer(self, name: str) -> Optional[onnx.NodeProto]:
        """The node writing ``name``; None for graph inputs and initializers."""
        return self._producer.get(name)

    def consumers(self, name: str) -> List[Tuple[onnx.NodeProto, int]]:
        """``(node, input index)`` for every read of ``name``."""
        return self._consumers.get(name, [])

    def readers(self, name: str) -> List[onnx.NodeProto]:
        """The nodes reading ``name``, once per read."""
        return [node for node, _ in self.consumers(name)]

    def array(self, name: str) -> Optional[np.ndarray]:
        """The value of initializer ``name`` (None when it is no initializer or its data is not readable)."""
        tensor = self.inits.get(name)
        if tensor is None:
            return None
        external = tensor.data_location == onnx.TensorProto.EXTERNAL
        if external and self.base_dir is None:
            return None  # data lives next to a file we were not given
        try:
            return numpy_helper.to_array(tensor, base_dir=str(self.base_dir) if external else "")
        except (OSError, ValueError, TypeError):
            return None

    def is_constant(self, name: str) -> bool:
        """True for initializers and outputs of Constant nodes."""
        node = self._producer.get(name)
        return name in self.inits or (node is not None and node.op_type == "Constant")

    def const(self, name: str) -> Optional[np.ndarray]:
        """The value of a constant tensor (initializer or Constant node), or None."""
        if name in self.inits:
            return self.array(name)
        node = self._producer.get(name)
        if node is None or node.op_type != "Constant" or not node.attribute:
            return None
        value = node.attribute[0]
        if value.name == "value":
            return numpy_helper.to_array(value.t)
        if value.name in ("value_float", "value_floats", "value_int", "value_ints"):
            return np.asarray(onnx.helper.get_attribute_value(value))
        return None  # sparse or string constants never hold a scale or a zero point

    def shape(self, name: str) -> Optional[Shape]:
        """Inferred shape of ``name`` (unknown dims as None), or None when even the rank is unknown.
        Shape inference runs on first use; a model it chokes on (custom ops) just has no shapes."""
        tensor = self.inits.get(name)
        if tensor is not None:
            return tuple(int(d) for d in tensor.dims)
        if self._shapes is None:
            self._shapes = _inferred_shapes(self.model) if self.model is not None else {}
        return self._shapes.get(name)

    # -- editing -------------------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        """A tensor/node name used nowhere in the graph yet: ``base``, else ``base_1``, ``base_2``, ..."""
        if self._names is None:
            g = self.graph
            self._names = ({n.name for n in g.node} | {t for n in g.node for t in list(n.input) + list(n.output)}
                           | {t.name for t in list(g.input) + list(g.output)} | set(self.inits))
        name, counter = base, 1
        while name in self._names:
            name, counter = f"{base}_{counter}", counter + 1
        self._names.add(name)
        return name

    def add_initializer(self, name: str, array: np.ndarray) -> str:
        """Add ``array`` as initializer ``name`` unless one of that name exists; returns the name."""
        if name not in self.inits:
            self.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
            self.inits[name] = self.graph.initializer[-1]   # append copies: index the graph's own message
        return name


def drop_unused_initializers(graph: onnx.GraphProto, candidates: Iterable[str]) -> None:
    """Remove the initializers in ``candidates`` that no node and no graph output reads any more."""
    candidates = set(candidates)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name not in candidates or i.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _inferred_shapes(model: onnx.ModelProto) -> Dict[str, Shape]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 -- any inference failure only means "shapes unknown"
        inferred = model
    shapes = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                                      for d in tensor_type.shape.dim)
    return shapes

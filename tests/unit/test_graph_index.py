"""vitdeploy/export/graph.py: the graph layer Q/DQ insertion, ONNX Runtime placement, FP16 and lint share."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from vitdeploy.export.graph import GraphIndex, attr, drop_unused_initializers


def _model():
    """x -> Add(w) -> Mul(c) -> y, where w is an initializer and c a Constant node; y is read twice."""
    w = numpy_helper.from_array(np.ones((2, 3), np.float32), "w")
    nodes = [
        helper.make_node("Add", ["x", "w"], ["a"], name="add"),
        helper.make_node("Constant", [], ["c"], name="const", value=numpy_helper.from_array(np.float32(2.0))),
        helper.make_node("Mul", ["a", "c"], ["y"], name="mul"),
        helper.make_node("Add", ["y", "y"], ["z"], name="double"),
        helper.make_node("Softmax", ["z"], ["p"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["n", 3])], initializer=[w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_lookups():
    g = GraphIndex(_model())
    assert g.producer("y").name == "mul" and g.producer("x") is None and g.producer("w") is None
    assert [(n.name, i) for n, i in g.consumers("y")] == [("double", 0), ("double", 1)]
    assert [n.name for n in g.readers("a")] == ["mul"] and g.readers("p") == []
    assert g.is_constant("w") and g.is_constant("c") and not g.is_constant("a")
    assert g.array("w").shape == (2, 3) and g.array("c") is None and float(g.const("c")) == 2.0
    assert attr(g.producer("p"), "axis") == -1 and attr(g.producer("p"), "missing", 7) == 7


def test_shapes_come_from_inference_on_first_use():
    g = GraphIndex(_model())
    assert g._shapes is None
    assert g.shape("w") == (2, 3) and g.shape("a") == (2, 3) and g.shape("x") == (None, 3)
    assert GraphIndex(_model().graph).shape("a") is None   # a bare graph: no inference


def test_fresh_names_and_initializers():
    model = _model()
    g = GraphIndex(model)
    assert g.fresh("y") == "y_1" and g.fresh("y") == "y_2" and g.fresh("mul") == "mul_1" and g.fresh("new") == "new"
    assert g.add_initializer("s", np.float32(0.5)) == "s" and g.add_initializer("s", np.float32(9.0)) == "s"
    assert [float(numpy_helper.to_array(t)) for t in model.graph.initializer if t.name == "s"] == [0.5]
    model.graph.node[0].input[1] = "x"   # nothing reads w any more
    drop_unused_initializers(model.graph, ["w", "s"])
    assert [t.name for t in model.graph.initializer] == []
    onnx.checker.check_model(model)

"""A PyTorch module as a Polygraphy runner: the reference the exported graphs are checked against."""
from __future__ import annotations

import time

from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.datatype import DataType


class TorchRunner(BaseRunner):
    def __init__(self, model, input_name: str, output_name: str, input_size):
        super().__init__(name="torch")
        self.model, self.input_name, self.output_name = model, input_name, output_name
        self.input_size = tuple(input_size)

    def activate_impl(self) -> None:
        self.model.eval()

    def get_input_metadata_impl(self):
        return TensorMetadata().add(self.input_name, DataType.FLOAT32, (None,) + self.input_size)

    def infer_impl(self, feed_dict):
        import torch

        start = time.perf_counter()
        with torch.no_grad():
            out = self.model(torch.from_numpy(feed_dict[self.input_name]))
        self.inference_time = time.perf_counter() - start
        return {self.output_name: out.numpy()}

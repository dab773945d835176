"""A PyTorch module behind the runner interface: the reference the exported graphs are checked against."""
from __future__ import annotations

from typing import Dict

import numpy as np

from .base import Runner, TensorSpec


class TorchRunner(Runner):
    name = "torch"

    def __init__(self, model, input_name: str, output_name: str, input_size):
        super().__init__()
        self.model, self.input_name, self.output_name = model, input_name, output_name
        self.input_size = tuple(input_size)

    def activate_impl(self) -> None:
        self.model.eval()

    def deactivate_impl(self) -> None:
        pass

    def input_spec_impl(self) -> Dict[str, TensorSpec]:
        return {self.input_name: TensorSpec((None,) + self.input_size, np.dtype(np.float32))}

    def infer_impl(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        import torch

        with torch.no_grad():
            out = self.model(torch.from_numpy(feeds[self.input_name]))
        return {self.output_name: out.numpy()}

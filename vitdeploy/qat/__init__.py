"""Quantization-aware training (``vitdeploy qat``): LSQ steps, IRM of q and k, distribution-guided
distillation; see train.py."""
from .train import QatSettings, parse_bits, train_qat  # noqa: F401

"""The ablation benchmark's paired significance test (McNemar, exact binomial)."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("ablation_bench", ROOT / "benchmarks" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mcnemar_exact_values(ablation):
    assert ablation.mcnemar(10, 0) == pytest.approx(2 / 2 ** 10)
    assert ablation.mcnemar(1, 4) == pytest.approx(2 * (1 + 5) / 2 ** 5)  # P(X ≤ 1), X ~ Bin(5, 1/2), twice


def test_mcnemar_ties_and_no_discordant_pairs_are_chance(ablation):
    assert ablation.mcnemar(2, 2) == 1.0
    assert ablation.mcnemar(0, 0) == 1.0


def test_mcnemar_is_symmetric_and_shrinks_with_evidence(ablation):
    assert ablation.mcnemar(3, 9) == ablation.mcnemar(9, 3)
    assert ablation.mcnemar(30, 90) < ablation.mcnemar(3, 9) < ablation.mcnemar(5, 7)


def test_paired_score_pairs_each_variant_with_the_first(ablation):
    import torch

    reference = torch.tensor([[3.0, 0.0], [0.0, 3.0], [3.0, 0.0], [0.0, 3.0]])
    score = ablation.PairedScore(reference, [0, 1, 1, 1])
    assert score.fp32_top1() == 75.0
    top1, agree, kl, versus = score(reference.clone())
    assert (top1, agree, kl, versus) == (75.0, 100.0, 0.0, "")     # the baseline: nothing to pair with
    flipped_two = torch.tensor([[0.0, 3.0], [3.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    top1, agree, kl, versus = score(flipped_two)
    assert (top1, agree) == (25.0, 50.0) and kl > 0
    assert versus.startswith("0 / 2 ")                               # broke two the baseline had right
    score.new_baseline()
    assert score(flipped_two)[3] == ""

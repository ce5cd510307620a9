"""Training parity with transformers (`diffjax.bench.parity`): transformers initialises the model, diffjax imports
it, and both train on the same packed batches of the default config with the same optimizer."""

import numpy as np
import pytest

from diffjax.bench import parity
from diffjax.config import base_config

pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(parity.VARIANTS))
def test_ten_training_steps_give_the_losses_of_transformers(variant):
    comparison = parity.compare(base_config(), variant, steps=10)
    print(parity.report([comparison]))
    assert abs(comparison.diffjax.eval_loss - comparison.transformers.eval_loss) <= 1e-5
    assert len(comparison.diffjax.losses) == len(comparison.transformers.losses) == 10
    np.testing.assert_allclose(comparison.diffjax.losses, comparison.transformers.losses, rtol=1e-5, atol=0)
    assert comparison.passed
    assert comparison.learning_rates[0] == 0.0 and comparison.learning_rates[-1] > 0  # warming up: the loss moves
    assert comparison.diffjax.losses[-1] < comparison.diffjax.losses[0] - 0.05

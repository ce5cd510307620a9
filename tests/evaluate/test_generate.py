import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffjax.evaluate.generate import greedy_generate
from diffjax.model import DiffTransformer


def test_greedy_generation_extends_the_prompt_one_argmax_at_a_time(tiny_model_config):
    model = DiffTransformer(tiny_model_config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    prompt = np.array([5, 9, 11], np.int32)
    generated = greedy_generate(graphdef, params, prompt, num_tokens=6)
    assert generated.shape == (6,)
    sequence = list(prompt)
    for _ in range(6):
        logits = model(jnp.asarray(sequence)[None])
        sequence.append(int(jnp.argmax(logits[0, -1])))
    np.testing.assert_array_equal(generated, sequence[len(prompt) :])

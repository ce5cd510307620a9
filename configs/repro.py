"""The small-scale DIFF-vs-Transformer reproduction of docs/reproduction.md, sized for a 2-core CPU.

A tiny model on a mixture of the embedded corpus and multi-needle documents (random depth, 4 needles,
2 questions, up to 480 bytes), 500 steps of 16 x 512 tokens (4.1M tokens); the baseline has the same
parameters bar the differential ones (2H heads of the same width, no lambda, no sub-layer norm).

Run:   python train.py --config=configs/repro.py:diff
       python train.py --config=configs/repro.py:standard
       python -m diffjax.evaluate --workdir=runs/repro_diff     (and runs/repro_standard)
       python -m diffjax.evaluate compare --runs=runs/repro_diff,runs/repro_standard
"""

from diffjax.config import base_config


def get_config(attention_type: str = "diff"):
    config = base_config()
    config.workdir = f"runs/repro_{attention_type}"
    config.model.attention_type = attention_type
    config.seq_len = 512
    config.batch_size = 16
    config.total_steps = 500
    config.warmup_steps = 60
    config.learning_rate = 2e-3
    config.end_learning_rate = 2e-4
    config.log_every_steps = 25
    config.eval_every_steps = 250
    config.checkpoint_every_steps = 250
    config.sample_tokens = 0
    config.data.mixture = "diffjax_corpus=0.5,needles=0.5"
    config.data.needles.update(
        context_length=480, num_needles=4, num_queries=2, depth=-1.0, num_train=8192, num_validation=256
    )
    return config

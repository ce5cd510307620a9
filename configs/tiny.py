"""Tiny Differential Transformer on the embedded Python-docs corpus: the default, for a laptop CPU.

Run:       python train.py                     (or --config=configs/tiny.py)
Baseline:  python train.py --config=configs/tiny.py:standard
V2:        python train.py --config=configs/tiny.py:diff_v2
"""

from diffjax.config import base_config


def get_config(attention_type: str = "diff"):
    config = base_config()
    config.model.attention_type = attention_type
    config.workdir = f"runs/tiny_{attention_type}"
    return config

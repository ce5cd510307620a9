"""Paper 13.1B (Table 9 / Appendix E): E=5120, 40 layers, H=20 differential heads, lr 7.5e-4.

Run:       python train.py --config=configs/paper_13b.py
Baseline:  python train.py --config=configs/paper_13b.py:standard   (2H heads, same parameter count)
V2:        python train.py --config=configs/paper_13b.py:diff_v2
"""

from diffjax.config import paper_config


def get_config(attention_type: str = "diff"):
    return paper_config(
        name="paper_13b", emb_dim=5120, num_layers=40, num_heads=20, learning_rate=7.5e-4, attention_type=attention_type
    )

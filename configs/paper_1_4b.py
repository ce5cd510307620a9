"""Paper 1.4B (Table 9 / Appendix E): E=2048, 24 layers, H=8 differential heads, lr 1.5e-3.

Run:       python train.py --config=configs/paper_1_4b.py
Baseline:  python train.py --config=configs/paper_1_4b.py:standard   (2H heads, same parameter count)
V2:        python train.py --config=configs/paper_1_4b.py:diff_v2
"""

from diffjax.config import paper_config


def get_config(attention_type: str = "diff"):
    return paper_config(
        name="paper_1_4b", emb_dim=2048, num_layers=24, num_heads=8, learning_rate=1.5e-3, attention_type=attention_type
    )

"""Paper 2.8B (Table 9 / Appendix E): E=2560, 32 layers, H=10 differential heads, lr 1.5e-3.

Run:       python train.py --config=configs/paper_2_8b.py
Baseline:  python train.py --config=configs/paper_2_8b.py:standard   (2H heads, same parameter count)
V2:        python train.py --config=configs/paper_2_8b.py:diff_v2
"""

from diffjax.config import paper_config


def get_config(attention_type: str = "diff"):
    return paper_config(
        name="paper_2_8b",
        emb_dim=2560,
        num_layers=32,
        num_heads=10,
        learning_rate=1.5e-3,
        attention_type=attention_type,
    )

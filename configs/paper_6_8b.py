"""Paper 6.8B (Table 9 / Appendix E): E=4096, 32 layers, H=16 differential heads, lr 7.5e-4.

Run:       python train.py --config=configs/paper_6_8b.py
Baseline:  python train.py --config=configs/paper_6_8b.py:standard   (2H heads, same parameter count)
V2:        python train.py --config=configs/paper_6_8b.py:diff_v2
"""

from diffjax.config import paper_config


def get_config(attention_type: str = "diff"):
    return paper_config(
        name="paper_6_8b",
        emb_dim=4096,
        num_layers=32,
        num_heads=16,
        learning_rate=7.5e-4,
        attention_type=attention_type,
    )

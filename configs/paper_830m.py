"""Paper 830M (Table 9 / Appendix E): E=1536, 24 layers, H=8 differential heads, lr 1.5e-3.

Run:       python train.py --config=configs/paper_830m.py
Baseline:  python train.py --config=configs/paper_830m.py:standard   (2H heads, same parameter count)
V2:        python train.py --config=configs/paper_830m.py:diff_v2
"""

from diffjax.config import paper_config


def get_config(attention_type: str = "diff"):
    return paper_config(
        name="paper_830m", emb_dim=1536, num_layers=24, num_heads=8, learning_rate=1.5e-3, attention_type=attention_type
    )

"""Paper 3B language model (Table 9): E=3072, 28 layers, H=12, FFN 8192, 4096-token context, 1T tokens.

Counted with one tied 100,288 x E embedding this is 3.48B parameters; the name is the paper's.

Run:       python train.py --config=configs/paper_3b.py
Baseline:  python train.py --config=configs/paper_3b.py:standard
V2:        python train.py --config=configs/paper_3b.py:diff_v2
"""

from diffjax.config import paper_config


def get_config(attention_type: str = "diff"):
    config = paper_config(
        name="paper_3b", emb_dim=3072, num_layers=28, num_heads=12, learning_rate=3.2e-4, attention_type=attention_type
    )
    config.model.mlp_dim = 8192
    config.seq_len = 4096
    config.batch_size = 1024  # 1024 x 4096 = 4.2M tokens
    config.total_steps = 238_419  # 1T tokens
    config.adam_b1, config.adam_b2 = 0.9, 0.95
    config.weight_decay = 0.1
    config.warmup_steps = 1000
    config.end_learning_rate = 1.28e-5
    return config

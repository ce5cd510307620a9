import subprocess
import sys

import pytest
from conftest import CONFIG_FILES, REPO, load_config

from diffjax.config import ConfigError, model_config, validate


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("attention_type", [None, "diff", "standard", "diff_v2"])
def test_every_config_validates(path, attention_type):
    config = load_config(path, attention_type)
    validate(config)
    assert model_config(config).attention_type == (attention_type or "diff")


def test_config_file_docstrings_give_the_run_command():
    for path in CONFIG_FILES:
        assert f"--config=configs/{path.name}" in path.read_text() or path.stem == "tiny", path


BAD_VALUES = [
    ({"model.emb_dim": 100, "model.num_heads": 3}, r"model\.emb_dim=100 is not divisible by 2\*model\.num_heads=6"),
    ({"model.num_heads": 4, "model.num_kv_heads": 3}, r"model\.num_heads=4 is not divisible by model\.num_kv_heads=3"),
    ({"model.attention_type": "linear"}, r"model\.attention_type='linear' is unknown"),
    ({"seq_len": 0}, r"seq_len=0 must be a positive integer"),
    ({"seq_len": -5}, r"seq_len=-5 must be a positive integer"),
    ({"model.emb_dim": 12, "model.num_heads": 2}, r"head width .*=3 is odd"),
    ({"seq_len": 1}, r"seq_len=1 is smaller than 2"),
    ({"data.mixture": "diffjax_corpus=0,needles=0"}, r"weights must be >= 0 and sum to a positive number"),
    ({"data.mixture": "diffjax_corpus=-1,needles=2"}, r"weights must be >= 0 and sum to a positive number"),
    ({"data.mixture": "diffjax_corpus"}, r"'diffjax_corpus' is not name=weight"),
    ({"data.packing": "greedy"}, r"data\.packing='greedy' is unknown"),
    ({"model.dtype": "float8"}, r"model\.dtype='float8' is unknown"),
    ({"model.remat_policy": "some"}, r"model\.remat_policy='some' is unknown"),
    ({"learning_rate": 0.0}, r"learning_rate=0\.0 must be a positive number"),
    ({"lr_schedule": "step"}, r"lr_schedule='step' is unknown"),
    ({"adam_b2": 1.0}, r"adam_b2=1\.0 must lie in \[0, 1\)"),
    ({"batch_size": 0}, r"batch_size=0 must be a positive integer"),
    ({"model.vocab_multiple": 0}, r"model\.vocab_multiple=0 must be a positive integer"),
]


@pytest.mark.parametrize("overrides,message", BAD_VALUES, ids=[m for _, m in BAD_VALUES])
def test_bad_values_are_rejected_with_one_line(overrides, message):
    config = load_config(REPO / "configs" / "tiny.py")
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        target = config
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    with pytest.raises(ConfigError, match=message) as error:
        validate(config)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "flag,expected",
    [
        ("--config.model.attention_type=linear", "model.attention_type='linear' is unknown"),
        ("--config.seq_len=0", "seq_len=0 must be a positive integer"),
        ("--config.seq_len=1", "seq_len=1 is smaller than 2"),
        ("--config.data.mixture=diffjax_corpus=0,needles=0", "weights must be >= 0 and sum to a positive number"),
        ("--config.no_such_key=1", "no_such_key"),
        ("--config.seq_len=abc", "seq_len"),
        ("--config=configs/missing.py", "config file configs/missing.py not found"),
        ("--config.model.vocab_size=100", "model.vocab_size=100 is smaller than the tokenizer's 259 ids"),
        ("--config.data.source=no_such_dataset", "data.source='no_such_dataset' is unknown"),
        ("--config.data.source=lm1b", "data.source='lm1b' is not prepared in"),
        ("--config.data.tokenizer=missing.model", "missing.model not found"),
    ],
)
def test_train_cli_rejects_bad_input_with_exit_code_2(tmp_path, flag, expected):
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "train.py", flag, f"--config.workdir={workdir}", f"--config.data.data_dir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error:") and expected in lines[0], result.stderr
    assert not workdir.exists()


def test_every_key_has_a_meaning_and_docs_config_md_is_current():
    from diffjax.config import KEY_HELP, base_config, leaves, reference

    assert leaves(base_config()).keys() == KEY_HELP.keys()
    assert all(KEY_HELP.values())
    documented = (REPO / "docs" / "config.md").read_text()
    assert documented == reference() + "\n", "regenerate docs/config.md as its header says"

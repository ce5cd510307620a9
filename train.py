"""Train a Differential Transformer.

    python train.py                                   # configs/tiny.py on the embedded corpus
    python train.py --config=configs/paper_830m.py    # a paper size
    python train.py --config=configs/tiny.py:standard --config.total_steps=100 --config.model.num_layers=2

Bad input (unknown key, wrong type, invalid value) ends with one `train.py: error: ...` line and exit code 2.
"""

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from diffjax.config import ConfigError

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tiny.py"
# What config_flags raises for an unknown key, a value of the wrong type or a missing/broken config file.
FLAG_ERRORS = (flags.Error, ValueError, AttributeError, KeyError, TypeError, OSError)


def fail(error: BaseException | str) -> None:
    if isinstance(error, AttributeError | KeyError):  # config_flags' word for a key the config lacks
        error = f"unknown config key {str(error).strip(chr(34))}; the config file lists every key"
    lines = str(error).strip().splitlines()
    print(f"train.py: error: {lines[0] if lines else type(error).__name__}", file=sys.stderr)
    sys.exit(2)


def check_config_path(argv: list[str]) -> None:
    """Name a missing config file plainly (config_flags only reports a failed import)."""
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg in ("--config", "-config") and i + 1 < len(argv) else None
        if arg.startswith(("--config=", "-config=")):
            value = arg.split("=", 1)[1]
        if value is not None and not Path(value.split(":", 1)[0]).is_file():
            fail(f"config file {value.split(':', 1)[0]} not found; pass --config=configs/<name>.py")


def parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except FLAG_ERRORS as error:
        fail(error)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; every option is a --flag")
    logging.set_verbosity(logging.WARNING)  # keep JAX's backend probing out of the run's output
    from diffjax.train.loop import run

    try:
        run(flags.FLAGS.config)
    except ConfigError as error:
        fail(error)


if __name__ == "__main__":
    check_config_path(sys.argv)
    try:  # config_flags reads the overrides in sys.argv as soon as the flag is defined
        config_flags.DEFINE_config_file("config", str(DEFAULT_CONFIG), "Config file, as path[:attention_type].")
    except FLAG_ERRORS as error:
        fail(error)
    app.run(main, flags_parser=parse_flags)

"""Train a Differential Transformer.

python train.py                                   # configs/tiny.py on the embedded corpus
python train.py --config=configs/paper_830m.py    # a paper size
python train.py --config=configs/tiny.py:standard --config.total_steps=100 --config.model.num_layers=2
"""

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from diffjax.config import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(Path(__file__).parent / "configs" / "tiny.py"), "Config file (path[:attention_type])."
)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with a one-line error and exit code 2 instead of a usage dump."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, ValueError, AttributeError, KeyError, TypeError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"train.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        print(f"train.py: error: unexpected arguments {argv[1:]}; every option is a --flag", file=sys.stderr)
        sys.exit(2)
    logging.set_verbosity(logging.WARNING)  # keep JAX's backend probing out of the run's output
    from diffjax.train.loop import run

    try:
        run(_CONFIG.value)
    except ConfigError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

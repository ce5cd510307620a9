"""What every diffjax command line shares: the `--config` flag and one-line errors (exit code 2 for bad input)."""

import difflib
import sys
from collections.abc import Callable
from pathlib import Path

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

# What config_flags raises for an unknown key, a value of the wrong type or a broken config file.
FLAG_ERRORS = (flags.Error, ValueError, AttributeError, KeyError, TypeError, OSError)


class UsageError(ValueError):
    """Bad input from the user: reported as one line, exit code 2, never a traceback."""


class RunFailure(RuntimeError):
    """A run stopped by something outside its input (storage failing mid-run): one line, exit code 1."""


KEYS_DOCUMENTED = "docs/config.md lists every key; `python train.py --print_config` prints a run's resolved config"
HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort")


def fail(program: str, error: BaseException | str, code: int = 2) -> None:
    lines = str(error).strip().splitlines()
    print(f"{program}: error: {lines[0] if lines else type(error).__name__}", file=sys.stderr)
    sys.exit(code)


def _config_keys(config: ml_collections.ConfigDict) -> list[str]:
    """Every dotted key of `config`, nested ones and the dicts holding them alike, sorted."""
    from diffjax.config import leaves  # config.py imports this module

    keys = set()
    for key in leaves(config):
        parts = key.split(".")
        keys |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return sorted(keys)


def unknown_key_message(argv: list[str], default_config: Path | None) -> str | None:
    """For the first `--config.KEY=VALUE` whose KEY the config lacks: the key, the nearest existing one, and
    where keys are documented. None when every override names a key (or the config cannot be read)."""
    from diffjax.config import load_config_file

    spec = str(default_config) if default_config else None
    for i, arg in enumerate(argv):
        if arg in ("--config", "-config") and i + 1 < len(argv):
            spec = argv[i + 1]
        elif arg.startswith(("--config=", "-config=")):
            spec = arg.split("=", 1)[1]
    if spec is None:
        return None
    path, _, choice = spec.partition(":")
    try:
        keys = _config_keys(load_config_file(path, choice or None))
    except Exception:  # a broken config file is reported by config_flags itself
        return None
    for arg in argv:
        key = arg.removeprefix("-").removeprefix("-").partition("=")[0]
        if not key.startswith("config.") or (key := key.removeprefix("config.")) in keys:
            continue
        nearest = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
        hint = f"; did you mean {nearest[0]!r}?" if nearest else ""
        return f"unknown config key {key!r}{hint}; {KEYS_DOCUMENTED}"
    return None


def _print_help(default_config: Path | None) -> None:
    """The command's docstring, its own flags and, for commands that take a config, how to see every key;
    exit code 0 (absl's --help exits 1 and lists no flag defined outside the main module)."""
    print((sys.modules["__main__"].__doc__ or "").strip() + "\n")
    own = flags.FLAGS.main_module_help().strip()
    if own:
        print(own + "\n")
    if default_config is not None:
        print(
            f"  --config: a config file, as path[:variant] (default {default_config.parent.name}/{default_config.name})"
            "\n  --config.KEY=VALUE: override any key of it, nested ones as --config.model.num_layers=2"
            f"\n\n{KEYS_DOCUMENTED}."
        )
    sys.exit(0)


def _check_config_path(program: str, argv: list[str]) -> None:
    """Name a missing config file plainly (config_flags only reports a failed import)."""
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg in ("--config", "-config") and i + 1 < len(argv) else None
        if arg.startswith(("--config=", "-config=")):
            value = arg.split("=", 1)[1]
        if value is not None and not Path(value.split(":", 1)[0]).is_file():
            fail(program, f"config file {value.split(':', 1)[0]} not found; pass --config=configs/<name>.py")


def run_main(program: str, main: Callable[[list[str]], None], default_config: Path | None = None) -> None:
    """Define `--config`, parse flags and run `main`, turning bad input anywhere into `program: error: ...`.

    `main` raises `UsageError` (or a subclass, such as `ConfigError`) for input it rejects.
    """
    _check_config_path(program, sys.argv)
    if any(arg in HELP_FLAGS for arg in sys.argv[1:]):
        _print_help(default_config)

    def report(error: BaseException) -> None:
        if isinstance(error, AttributeError | KeyError):  # config_flags' word for a key the config lacks
            error = unknown_key_message(sys.argv, default_config) or error
        fail(program, error)

    try:  # config_flags reads the overrides in sys.argv as soon as the flag is defined
        config_flags.DEFINE_config_file(
            "config", str(default_config) if default_config else None, "Config file, as path[:attention_type]."
        )
    except FLAG_ERRORS as error:
        report(error)

    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except FLAG_ERRORS as error:
            report(error)

    def guarded_main(argv: list[str]) -> None:
        logging.set_verbosity(logging.ERROR)  # keep JAX backend probing and TFDS chatter out of the output
        try:
            main(argv)
        except UsageError as error:
            fail(program, error)
        except RunFailure as error:
            fail(program, error, code=1)

    app.run(guarded_main, flags_parser=parse)

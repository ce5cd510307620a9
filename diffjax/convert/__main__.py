"""Weight conversion CLI.

    python -m diffjax.convert export --workdir=runs/tiny_diff [--step=N] --format=hf|microsoft --out=DIR \\
        [--dtype=bfloat16] [--max_shard_size=5GB]
    python -m diffjax.convert import --hf=DIR --out=WORKDIR         (or --microsoft=DIR)

Bad input (unknown model type, odd key/value head count, missing file, a tensor of the wrong shape) ends
with one `python -m diffjax.convert: error: ...` line and exit code 2, and nothing is written.
"""

from absl import flags

from diffjax import files
from diffjax.cli import UsageError, run_main

_WORKDIR = flags.DEFINE_string("workdir", None, "export: run directory, its checkpoints/ or one step's directory.")
_STEP = flags.DEFINE_integer("step", None, "export: checkpoint step (default: the latest complete one).")
_FORMAT = flags.DEFINE_enum("format", "hf", ["hf", "microsoft"], "export: Hugging Face or Microsoft layout.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "export: dtype of the written weights.")
_MAX_SHARD_SIZE = flags.DEFINE_string("max_shard_size", "5GB", "export: larger weights are split into shards.")
_HF = flags.DEFINE_string("hf", None, "import: a Hugging Face DiffLlama or Llama directory.")
_MICROSOFT = flags.DEFINE_string("microsoft", None, "import: a directory written by export --format=microsoft.")
_OUT = flags.DEFINE_string("out", None, "Directory to create (must not exist yet).")


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in ("export", "import"):
        raise UsageError(f"name one command: export or import (got {argv[1:]})")
    if not _OUT.value:
        raise UsageError("--out is required: the directory to create")
    from diffjax.convert.runs import export_run, import_run

    files.check_access(_OUT.value, "--out", write=True)
    if argv[1] == "export":
        if not _WORKDIR.value:
            raise UsageError("export needs --workdir=<run directory>")
        files.check_access(_WORKDIR.value, "--workdir")
        out = export_run(
            _WORKDIR.value,
            _OUT.value,
            _FORMAT.value,
            step=_STEP.value,
            dtype=_DTYPE.value,
            max_shard_size=_MAX_SHARD_SIZE.value,
        )
        print(f"wrote {_FORMAT.value} weights to {out}")
        return
    if bool(_HF.value) == bool(_MICROSOFT.value):
        raise UsageError("import needs exactly one of --hf=<dir> and --microsoft=<dir>")
    fmt, source = ("hf", _HF.value) if _HF.value else ("microsoft", _MICROSOFT.value)
    files.check_access(source, f"--{fmt}")
    out = import_run(source, _OUT.value, fmt)
    config = out / "config.py"
    if files.is_remote(out):  # config files are Python modules, imported from a local path
        print(f"wrote a diffjax checkpoint to {out}; fine-tune with: gcloud storage cp {config} imported_config.py && "
              "python train.py --config=imported_config.py")  # fmt: skip
    else:
        print(f"wrote a diffjax checkpoint to {out}; fine-tune with: python train.py --config={config}")


if __name__ == "__main__":
    run_main("python -m diffjax.convert", main)

"""Whole conversions between a diffjax run directory and an external directory, validated before anything is written.

Export reads a run's checkpoint (`load_model`); import writes a parameters-only checkpoint at step 0
(`<out>/checkpoints/0/`) and `<out>/config.py`, whose `init_from` points at it, so
`python train.py --config=<out>/config.py` fine-tunes the imported model in `<out>_finetune`.
"""

from collections.abc import Callable

import ml_collections
from etils import epath

from diffjax import files
from diffjax.config import base_config, check_tokenizer, model_config, validate
from diffjax.convert.files import DTYPES, staged
from diffjax.convert.hf import export_hf, import_hf
from diffjax.convert.layout import ConversionError, Params
from diffjax.convert.microsoft import export_microsoft, import_microsoft
from diffjax.convert.params import flat_params, to_state
from diffjax.convert.tokenizer import export_tokenizer, import_tokenizer, run_tokenizer, special_ids
from diffjax.evaluate.load import load_model
from diffjax.model import ModelConfig
from diffjax.parallel.mesh import make_mesh
from diffjax.train.checkpoint import run_metadata, save_params

FORMATS = ("hf", "microsoft")
IMPORTERS: dict[str, Callable[[epath.Path], tuple[ModelConfig, Params]]] = {
    "hf": import_hf,
    "microsoft": import_microsoft,
}
# The ModelConfig fields an external checkpoint determines; the rest (dtypes, remat, kernels) keep their defaults.
IMPORTED_FIELDS = (
    "vocab_size",
    "emb_dim",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "mlp_dim",
    "attention_type",
    "tie_embeddings",
    "subln_affine",
    "rope_theta",
    "rms_norm_eps",
    "lambda_std_dev",
    "init_std",
)


def export_run(
    workdir: files.PathLike,
    out: files.PathLike,
    fmt: str,
    *,
    step: int | None = None,
    dtype: str = "float32",
    max_shard_size: int | str = "5GB",
) -> epath.Path:
    """Write the model of `workdir` (latest step, or `step`) to `out` in `fmt` (`hf` or `microsoft`)."""
    if fmt not in FORMATS:
        raise ConversionError(f"--format={fmt!r} is unknown; choose one of {list(FORMATS)}")
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype={dtype!r} is unknown; choose one of {list(DTYPES)}")
    out = files.path(out)
    model, config = load_model(workdir, step)
    cfg = model_config(config)
    params = flat_params(model.params, cfg)
    tokenizer = run_tokenizer(config.data.tokenizer) if fmt == "hf" else None
    with staged(out, last="config.json") as directory:  # what transformers reads first
        if fmt == "hf":
            ids = special_ids(tokenizer)
            sizes = {"max_shard_size": max_shard_size, "max_positions": config.seq_len}
            export_hf(directory, params, cfg, dtype=dtype, special_ids=ids, **sizes)
            export_tokenizer(directory, tokenizer, config.seq_len)
        else:
            export_microsoft(directory, params, cfg, dtype=dtype, max_shard_size=max_shard_size)
    return out


def run_config(cfg: ModelConfig, out: epath.Path) -> ml_collections.ConfigDict:
    """The default config with the imported model, fine-tuning from `out` into `<out>_finetune`."""
    config = base_config()
    config.model.update({name: getattr(cfg, name) for name in IMPORTED_FIELDS})
    out = files.absolute(out)
    config.workdir = str(out.with_name(f"{out.name}_finetune"))
    config.init_from = str(out)
    validate(config)
    return config


def config_file(config: ml_collections.ConfigDict, source: epath.Path) -> str:
    """`config.py` text: the defaults plus what differs from them, for `train.py --config=`."""
    model = {name: config.model[name] for name in IMPORTED_FIELDS}
    lines = "".join(f"        {name}={value!r},\n" for name, value in model.items())
    tokenizer = f"    config.data.tokenizer = {config.data.tokenizer!r}\n" if config.data.tokenizer != "byte" else ""
    return (
        f'"""Imported from {source} by `python -m diffjax.convert import`.\n\n'
        f"Fine-tune: python train.py --config={files.path(config.init_from) / 'config.py'}\n"
        '"""\n\n'
        "from diffjax.config import base_config\n\n\n"
        "def get_config():\n"
        "    config = base_config()\n"
        f"    config.model.update(\n{lines}    )\n"
        f"{tokenizer}"
        f"    config.workdir = {config.workdir!r}\n"
        f"    config.init_from = {config.init_from!r}\n"
        "    return config\n"
    )


def import_run(source: files.PathLike, out: files.PathLike, fmt: str = "hf") -> epath.Path:
    """Write the model of an external directory as a diffjax checkpoint at step 0 plus `config.py` into `out`.

    A gs:// `out` gets the checkpoint straight from Orbax (its commit markers are what a reader checks on
    Cloud Storage); the other files are staged locally and uploaded, `config.py` last.
    """
    source, out = files.path(source), files.path(out)
    if not source.is_dir():
        raise ConversionError(f"{source} is not a directory")
    cfg, params = IMPORTERS[fmt](source)
    config = run_config(cfg, out)
    state = to_state(params, model_config(config))  # the run's layout: its vocabulary padding
    with staged(out, last="config.py") as directory:
        imported = import_tokenizer(source, directory) if fmt == "hf" else None
        if imported:  # the tokenizer travels with the model; the byte tokenizer otherwise
            name, tokenizer = imported
            config.data.tokenizer = str(files.absolute(out) / name)
            check_tokenizer(config, tokenizer)
        metadata = run_metadata(config, make_mesh((1, -1, 1))) | {"imported_from": f"{fmt}:{files.absolute(source)}"}
        save_params(out if files.is_remote(out) else directory, 0, state, metadata)
        (directory / "config.py").write_text(config_file(config, files.absolute(source)))
    return out

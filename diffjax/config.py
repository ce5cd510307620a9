"""The one place config rules live: defaults, the paper's hyperparameters, validation, derived values.

Config files in `configs/` call `base_config()` or `paper_config()` and override what differs;
`validate()` runs before anything is compiled and raises `ConfigError` with one line that names the
key, the value and the fix.
"""

import importlib.util
import math
from pathlib import Path

import jax.numpy as jnp
import ml_collections

from diffjax.cli import UsageError
from diffjax.model.attention import ATTENTION_TYPES
from diffjax.model.model_config import ModelConfig
from diffjax.model.transformer import REMAT_POLICIES
from diffjax.ops.dispatch import unavailable_reason
from diffjax.parallel.sharding import DEFAULT_RULES

PAPER_VOCAB_SIZE = 100_288
LR_SCHEDULES = ("cosine", "linear")
DTYPES = ("float32", "bfloat16", "float16")
PACKINGS = ("concat", "first_fit")
PREFETCH = ("threads", "processes", "none")


class ConfigError(UsageError):
    """A config value that cannot work; the message is one line and says how to fix it."""


def base_config() -> ml_collections.ConfigDict:
    """Every key with its default; `configs/tiny.py` is this plus a run directory."""
    config = ml_collections.ConfigDict()
    config.workdir = "runs/tiny"
    config.seed = 0
    config.total_steps = 400
    config.batch_size = 16  # global, in sequences
    config.seq_len = 128
    config.learning_rate = 3e-3
    config.end_learning_rate = 3e-4
    config.lr_schedule = "cosine"
    config.warmup_steps = 40  # linear warmup; a shorter run warms up over all its steps (said at start-up)
    config.adam_b1 = 0.9
    config.adam_b2 = 0.98
    config.adam_eps = 1e-8
    config.weight_decay = 0.05
    config.grad_clip_norm = 1.0
    config.log_every_steps = 20
    config.eval_every_steps = 200  # 0: evaluate only at the start and the end
    config.eval_batches = 8
    config.sample_prompt = "The "
    config.sample_tokens = 96
    config.grad_accum_steps = 1  # micro-batches per step (lax.scan), normalised by the real token count
    config.z_loss = 0.0  # weight of log(Z)^2, as in PaLM (1e-4 there); 0: off
    config.nan_policy = "stop"  # a non-finite loss or gradient: "stop" the run or "skip" the update
    config.compilation_cache_dir = ""  # persistent XLA cache; "" = off
    config.profile_start_step = -1  # jax.profiler trace of profile_steps steps from here into <workdir>/profile
    config.profile_steps = 5
    config.cpu_peak_tflops = 1.0  # per core-set peak used for MFU on CPU (accelerators come from a table)
    config.aot_topology = ""  # e.g. "v5p:4x4x4": compile for that TPU slice with libtpu and exit
    config.checkpoint_every_steps = 100  # asynchronous saves to <workdir>/checkpoints (0: only at the end)
    config.keep_checkpoints = 3  # the latest N checkpoints are kept...
    config.keep_period = 0  # ...and every one whose step is a multiple of this, for good (0: none)
    config.init_from = ""  # fine-tuning: parameters only, from a workdir, its checkpoints/ or one step's directory
    config.restart_from_scratch = False  # start over although the workdir holds checkpoints, none of them usable
    config.mesh = ml_collections.ConfigDict(dict(shape=(1, -1, 1), dcn_shape=(1, 1, 1)))  # (data, fsdp, tensor)
    config.sharding_rules = DEFAULT_RULES
    config.distributed = ml_collections.ConfigDict(
        dict(coordinator="", num_processes=0, process_id=-1, timeout_s=300)  # empty: auto-detect or single host
    )
    config.data = ml_collections.ConfigDict(
        dict(
            source="diffjax_corpus",  # or text_files, needles, or any TFDS dataset name (lm1b, c4/en, ...)
            mixture="",  # "name=weight,name=weight" over sources; overrides `source` when set
            data_dir="~/tensorflow_datasets",
            files="",  # text_files: comma-separated paths or globs of .txt, .md, .jsonl
            validation_fraction=0.1,  # text_files: share of documents held out
            text_field="text",  # the feature holding the text, for TFDS datasets
            validation_split="validation",  # for TFDS datasets whose held-out split has another name
            tokenizer="byte",  # or the path of a SentencePiece model
            packing="concat",  # concat (concatenate and split) or first_fit
            shuffle_window=1024,  # packed training rows shuffled in windows of this many (0: off)
            num_epochs=0,  # 0: repeat forever
            prefetch="threads",  # threads, processes or none
            num_workers=2,
            needles=ml_collections.ConfigDict(
                dict(
                    context_length=4096,  # bytes of text per document
                    num_needles=4,
                    num_queries=2,
                    depth=0.5,  # where the needles start, as a fraction of the haystack
                    num_train=2048,
                    num_validation=128,
                    seed=0,
                )
            ),
        )
    )
    config.model = ml_collections.ConfigDict(
        dict(
            vocab_size=259,  # the byte tokenizer's 256 bytes + PAD, BOS, EOS (checked at start-up)
            emb_dim=128,
            num_layers=4,
            num_heads=2,  # differential heads H; the standard baseline uses 2H
            num_kv_heads=2,
            mlp_dim=352,
            attention_type="diff",
            tie_embeddings=True,
            subln_affine=True,
            rope_theta=10_000.0,
            rms_norm_eps=1e-6,
            lambda_std_dev=0.1,
            init_std=0.02,
            dtype="float32",
            param_dtype="float32",
            remat_policy="none",
            scan_layers=True,  # False unrolls the layer loop (faster small models on CPU, slower compiles)
            attention_impl="auto",  # auto, reference, blockwise or pallas (diffjax.ops.dispatch)
            attention_block_q=0,  # query/key tile sizes, powers of two; 0: the core's default (blockwise 128,
            attention_block_k=0,  # pallas per chip: diffjax.ops.pallas_tpu / pallas_gpu default_blocks)
        )
    )
    return config


def paper_config(
    *,
    name: str,
    emb_dim: int,
    num_layers: int,
    num_heads: int,
    learning_rate: float,
    attention_type: str = "diff",
) -> ml_collections.ConfigDict:
    """A scaling-curve model of Table 9 / Appendix E: seq 2048, 0.25M-token batches, 40k steps.

    The FFN is 8/3 E rounded to a multiple of 128 (exact for 830M; the paper states 8/3 E).
    """
    config = base_config()
    config.workdir = f"runs/{name}_{attention_type}"
    config.total_steps = 40_000
    config.seq_len = 2048
    config.batch_size = 128  # 128 x 2048 = 0.26M tokens
    config.learning_rate = learning_rate
    config.end_learning_rate = 0.0
    config.lr_schedule = "linear"
    config.warmup_steps = 375
    config.adam_b1, config.adam_b2 = 0.9, 0.98
    config.weight_decay = 0.05
    config.log_every_steps = 100
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 1000
    config.keep_period = 10_000
    config.model.update(
        vocab_size=PAPER_VOCAB_SIZE,
        emb_dim=emb_dim,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_heads,
        mlp_dim=128 * round(8 * emb_dim / 3 / 128),
        attention_type=attention_type,
        dtype="bfloat16",
        remat_policy="full",
    )
    return config


def _fail(message: str) -> None:
    raise ConfigError(message)


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise `ConfigError` on the first value that cannot work."""
    model = config.model
    for key, value in [
        ("total_steps", config.total_steps),
        ("batch_size", config.batch_size),
        ("seq_len", config.seq_len),
        ("log_every_steps", config.log_every_steps),
        ("eval_batches", config.eval_batches),
        ("model.vocab_size", model.vocab_size),
        ("model.emb_dim", model.emb_dim),
        ("model.num_layers", model.num_layers),
        ("model.num_heads", model.num_heads),
        ("model.num_kv_heads", model.num_kv_heads),
        ("model.mlp_dim", model.mlp_dim),
    ]:
        if value <= 0:
            _fail(f"{key}={value} must be a positive integer")
    for key in ("attention_block_q", "attention_block_k"):
        value = model[key]
        if value < 0 or value & (value - 1):
            _fail(f"model.{key}={value} must be a power of two (e.g. 128, 512), or 0 for the default tiles")
    for key, value in [
        ("warmup_steps", config.warmup_steps),
        ("eval_every_steps", config.eval_every_steps),
        ("sample_tokens", config.sample_tokens),
    ]:
        if value < 0:
            _fail(f"{key}={value} must be >= 0")
    if model.attention_type not in ATTENTION_TYPES:
        _fail(f"model.attention_type={model.attention_type!r} is unknown; choose one of {sorted(ATTENTION_TYPES)}")
    if reason := unavailable_reason(model.attention_impl):
        _fail(f"model.{reason}")
    if model.emb_dim % (2 * model.num_heads):
        _fail(
            f"model.emb_dim={model.emb_dim} is not divisible by 2*model.num_heads={2 * model.num_heads}; "
            "pick emb_dim as a multiple of twice the differential head count"
        )
    if (model.emb_dim // (2 * model.num_heads)) % 2:
        _fail(
            f"head width emb_dim/(2*num_heads)={model.emb_dim // (2 * model.num_heads)} is odd; "
            "RoPE needs an even head width"
        )
    if model.num_heads % model.num_kv_heads:
        _fail(
            f"model.num_heads={model.num_heads} is not divisible by model.num_kv_heads={model.num_kv_heads}; "
            "use a divisor of num_heads for num_kv_heads"
        )
    for key in ("dtype", "param_dtype"):
        if model[key] not in DTYPES:
            _fail(f"model.{key}={model[key]!r} is unknown; choose one of {list(DTYPES)}")
    if model.remat_policy not in ("none", *REMAT_POLICIES):
        _fail(f"model.remat_policy={model.remat_policy!r} is unknown; choose one of {['none', *REMAT_POLICIES]}")
    if not (math.isfinite(config.learning_rate) and config.learning_rate > 0):
        _fail(f"learning_rate={config.learning_rate} must be a positive number")
    if not 0 <= config.end_learning_rate <= config.learning_rate:
        _fail(f"end_learning_rate={config.end_learning_rate} must lie in [0, learning_rate={config.learning_rate}]")
    if config.lr_schedule not in LR_SCHEDULES:
        _fail(f"lr_schedule={config.lr_schedule!r} is unknown; choose one of {list(LR_SCHEDULES)}")
    if config.seq_len < 2:
        _fail(f"seq_len={config.seq_len} is smaller than 2; a packed row needs at least two tokens")
    _validate_data(config.data)
    for key in ("adam_b1", "adam_b2"):
        if not 0 <= config[key] < 1:
            _fail(f"{key}={config[key]} must lie in [0, 1)")
    if config.grad_accum_steps < 1 or config.batch_size % config.grad_accum_steps:
        _fail(f"grad_accum_steps={config.grad_accum_steps} must be >= 1 and divide batch_size={config.batch_size}")
    if config.nan_policy not in ("stop", "skip"):
        _fail(f"nan_policy={config.nan_policy!r} is unknown; choose 'stop' or 'skip'")
    if config.z_loss < 0:
        _fail(f"z_loss={config.z_loss} must be >= 0")
    if config.weight_decay < 0:
        _fail(f"weight_decay={config.weight_decay} must be >= 0")
    if config.grad_clip_norm <= 0:
        _fail(f"grad_clip_norm={config.grad_clip_norm} must be positive")
    for key in ("checkpoint_every_steps", "keep_period"):
        if config[key] < 0:
            _fail(f"{key}={config[key]} must be >= 0")
    if config.keep_checkpoints < 1:
        _fail(f"keep_checkpoints={config.keep_checkpoints} must be >= 1; the latest checkpoint is what a restart needs")


def _validate_data(data: ml_collections.ConfigDict) -> None:
    parse_mixture(data)
    if data.packing not in PACKINGS:
        _fail(f"data.packing={data.packing!r} is unknown; choose one of {list(PACKINGS)}")
    if data.prefetch not in PREFETCH:
        _fail(f"data.prefetch={data.prefetch!r} is unknown; choose one of {list(PREFETCH)}")
    for key in ("num_workers", "num_epochs", "shuffle_window"):
        if data[key] < 0:
            _fail(f"data.{key}={data[key]} must be >= 0")
    if not 0 <= data.validation_fraction < 1:
        _fail(f"data.validation_fraction={data.validation_fraction} must lie in [0, 1)")


def parse_mixture(data: ml_collections.ConfigDict) -> list[tuple[str, float]]:
    """`[(source, weight)]` with positive weights, from `data.mixture` ("name=weight,...") or `data.source`."""
    if not data.mixture.strip():
        if not data.source.strip():
            _fail("data.source is empty; name a source such as diffjax_corpus, text_files, needles or a TFDS dataset")
        return [(data.source.strip(), 1.0)]
    parts = []
    for item in (part.strip() for part in data.mixture.split(",") if part.strip()):
        name, _, weight = item.partition("=")
        try:
            parts.append((name.strip(), float(weight)))
        except ValueError:
            _fail(f"data.mixture: {item!r} is not name=weight (e.g. diffjax_corpus=0.9,needles=0.1)")
    total = sum(weight for _, weight in parts)
    if any(not math.isfinite(w) or w < 0 for _, w in parts) or not total > 0:
        _fail(f"data.mixture={data.mixture!r}: weights must be >= 0 and sum to a positive number")
    return [(name, weight / total) for name, weight in parts if weight > 0]


def check_tokenizer(config: ml_collections.ConfigDict, tokenizer) -> None:
    """The model's embedding must cover every id the tokenizer emits (larger is fine: padded vocab)."""
    if config.model.vocab_size < tokenizer.vocab_size:
        _fail(
            f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} ids "
            f"(data.tokenizer={config.data.tokenizer!r}); set model.vocab_size to at least {tokenizer.vocab_size}"
        )


def load_config_file(path: str | Path, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of a config file, as `--config=path:arg` gives it, for code that is not a CLI."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The typed model hyperparameters of a validated config."""
    values = config.model.to_dict()
    values["dtype"] = jnp.dtype(values["dtype"])
    values["param_dtype"] = jnp.dtype(values["param_dtype"])
    return ModelConfig(**values)

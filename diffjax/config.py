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
    """Every key with its default (`KEY_HELP` says what each means); `configs/tiny.py` is this plus a run
    directory."""
    config = ml_collections.ConfigDict()
    config.workdir = "runs/tiny"
    config.seed = 0
    config.total_steps = 400
    config.batch_size = 16
    config.seq_len = 128
    config.learning_rate = 3e-3
    config.end_learning_rate = 3e-4
    config.lr_schedule = "cosine"
    config.warmup_steps = 40
    config.adam_b1 = 0.9
    config.adam_b2 = 0.98
    config.adam_eps = 1e-8
    config.weight_decay = 0.05
    config.grad_clip_norm = 1.0
    config.log_every_steps = 20
    config.eval_every_steps = 200
    config.eval_batches = 8
    config.sample_prompt = "The "
    config.sample_tokens = 96
    config.grad_accum_steps = 1
    config.z_loss = 0.0
    config.nan_policy = "stop"
    config.compilation_cache_dir = ""
    config.profile_start_step = -1
    config.profile_steps = 5
    config.cpu_peak_tflops = 1.0
    config.aot_topology = ""
    config.checkpoint_every_steps = 100
    config.keep_checkpoints = 3
    config.keep_period = 0
    config.init_from = ""
    config.restart_from_scratch = False
    config.mesh = ml_collections.ConfigDict(dict(shape=(1, -1, 1), dcn_shape=(1, 1, 1)))
    config.sharding_rules = DEFAULT_RULES
    config.distributed = ml_collections.ConfigDict(dict(coordinator="", num_processes=0, process_id=-1, timeout_s=300))
    config.data = ml_collections.ConfigDict(
        dict(
            source="diffjax_corpus",
            mixture="",
            data_dir="~/tensorflow_datasets",
            cache_dir="~/.cache/diffjax/datasets",
            files="",
            validation_fraction=0.1,
            text_field="text",
            validation_split="validation",
            tokenizer="byte",
            packing="concat",
            shuffle_window=1024,
            num_epochs=0,
            prefetch="threads",
            num_workers=2,
            needles=ml_collections.ConfigDict(
                dict(
                    context_length=4096,
                    num_needles=4,
                    num_queries=2,
                    depth=0.5,
                    num_train=2048,
                    num_validation=128,
                    seed=0,
                )
            ),
        )
    )
    config.model = ml_collections.ConfigDict(
        dict(
            vocab_size=259,
            emb_dim=128,
            num_layers=4,
            num_heads=2,
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
            scan_layers=True,
            attention_impl="auto",
            attention_block_q=0,
            attention_block_k=0,
            vocab_multiple=128,
        )
    )
    return config


KEY_HELP = {
    "workdir": "run directory (local or gs://): checkpoints/, metrics.jsonl, eval.jsonl, tensorboard/, config.json",
    "seed": "parameter initialisation and data order",
    "total_steps": "optimizer steps of the whole run (a resumed run continues to it)",
    "batch_size": "global batch, in sequences of seq_len tokens",
    "seq_len": "tokens per training sequence",
    "learning_rate": "peak learning rate, reached after warmup",
    "end_learning_rate": "learning rate at total_steps",
    "lr_schedule": "decay after warmup: cosine or linear",
    "warmup_steps": "linear warmup steps; a shorter run warms up over all its steps (said at start-up)",
    "adam_b1": "AdamW beta1",
    "adam_b2": "AdamW beta2",
    "adam_eps": "AdamW epsilon",
    "weight_decay": "AdamW weight decay (projection kernels and embeddings; not norm gains or lambdas)",
    "grad_clip_norm": "gradients are clipped to this global norm",
    "log_every_steps": "steps between metrics records (and plain progress lines without a terminal)",
    "eval_every_steps": "steps between validation evaluations (0: only at the start and the end)",
    "eval_batches": "validation batches per evaluation",
    "sample_prompt": "prompt of the greedy sample printed at the end",
    "sample_tokens": "tokens of that sample (0: none)",
    "grad_accum_steps": "micro-batches per step (lax.scan), normalised by the real token count",
    "z_loss": "weight of log(Z)^2, as in PaLM (1e-4 there); 0: off",
    "nan_policy": "a non-finite loss or gradient: stop the run, or skip the update",
    "compilation_cache_dir": "persistent XLA compilation cache directory (empty: off)",
    "profile_start_step": "first step of a jax.profiler trace into <workdir>/profile (-1: none)",
    "profile_steps": "steps the trace covers",
    "cpu_peak_tflops": "peak TFLOP/s of the CPU, for MFU on CPU (accelerators come from a table)",
    "aot_topology": "compile for this TPU slice with libtpu and exit, e.g. v5p:4x4x4 (empty: train)",
    "checkpoint_every_steps": "steps between asynchronous saves to <workdir>/checkpoints (0: only at the end)",
    "keep_checkpoints": "the latest N checkpoints are kept",
    "keep_period": "checkpoints whose step is a multiple of this are kept for good (0: none)",
    "init_from": "fine-tuning: parameters only, from a workdir, its checkpoints/ or one step's directory",
    "restart_from_scratch": "start over although the workdir holds checkpoints, none of them usable",
    "mesh.shape": "devices per axis (data, fsdp, tensor) within a slice; -1: the rest",
    "mesh.dcn_shape": "slices per axis (data, fsdp, tensor) across the data-centre network",
    "sharding_rules": "logical axis -> mesh axes (diffjax.parallel.sharding)",
    "distributed.coordinator": "multi-host coordinator address (empty: auto-detect or a single host)",
    "distributed.num_processes": "number of hosts (0: auto-detect)",
    "distributed.process_id": "this host's index (-1: auto-detect)",
    "distributed.timeout_s": "seconds to wait for the other hosts",
    "data.source": "diffjax_corpus, text_files, needles, or any TFDS dataset name (lm1b, c4/en, ...)",
    "data.mixture": "name=weight,name=weight over sources; overrides source when set",
    "data.data_dir": "where TFDS datasets are prepared and read (a local path or gs://bucket/path)",
    "data.cache_dir": "local copy of datasets read from a gs:// data_dir (array_record is read from local disks)",
    "data.files": "text_files: comma-separated paths or globs of .txt, .md, .jsonl",
    "data.validation_fraction": "text_files: share of documents held out",
    "data.text_field": "the feature holding the text, for TFDS datasets",
    "data.validation_split": "the held-out split's name, for TFDS datasets",
    "data.tokenizer": "byte, a SentencePiece model, or a Hugging Face tokenizer.json (or its directory)",
    "data.packing": "concat (concatenate and split) or first_fit (whole documents per row)",
    "data.shuffle_window": "packed training rows shuffled in windows of this many (0: off)",
    "data.num_epochs": "passes over the training data (0: repeat forever)",
    "data.prefetch": "input workers: threads, processes or none",
    "data.num_workers": "input worker count",
    "data.needles.context_length": "needles source: bytes of text per document",
    "data.needles.num_needles": "needles source: needles per document",
    "data.needles.num_queries": "needles source: questions per document",
    "data.needles.depth": "needles source: where the needles start, as a fraction of the haystack",
    "data.needles.num_train": "needles source: training documents",
    "data.needles.num_validation": "needles source: validation documents",
    "data.needles.seed": "needles source: generator seed",
    "model.vocab_size": "token ids the model knows, at least the tokenizer's (byte: 256 bytes + PAD, BOS, EOS = 259)",
    "model.emb_dim": "model width",
    "model.num_layers": "decoder layers",
    "model.num_heads": "differential heads H; the standard baseline uses 2H",
    "model.num_kv_heads": "key/value heads, in the same units as num_heads (GQA when fewer)",
    "model.mlp_dim": "SwiGLU hidden width",
    "model.attention_type": "diff (v1), diff_v2 or standard (the Transformer baseline)",
    "model.tie_embeddings": "share the embedding with the LM head",
    "model.subln_affine": "a learned gain on DIFF's per-head RMSNorm (False: the Hugging Face layout)",
    "model.rope_theta": "RoPE base",
    "model.rms_norm_eps": "RMSNorm epsilon",
    "model.lambda_std_dev": "initial spread of DIFF's lambda vectors",
    "model.init_std": "standard deviation of the weight initialisation",
    "model.dtype": "activation dtype: float32, bfloat16 or float16",
    "model.param_dtype": "parameter dtype",
    "model.remat_policy": "what the backward pass recomputes: none, minimal, save_attention or full",
    "model.scan_layers": "scan over layers (False unrolls: faster small models on CPU, slower compiles)",
    "model.attention_impl": "attention core: auto, reference, blockwise or pallas (diffjax.ops.dispatch)",
    "model.attention_block_q": "query tile, a power of two (0: the core's default: blockwise 128, pallas per chip)",
    "model.attention_block_k": "key tile, a power of two (0: the core's default: blockwise 128, pallas per chip)",
    "model.vocab_multiple": "embedding/LM-head rows are vocab_size rounded up to a multiple of this; the extra "
    "rows stay zero and their logits are masked (1: no padding)",
}


def leaves(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, object]:
    """Every leaf key of `config`, dotted, with its value."""
    found = {}
    for name, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            found |= leaves(value, f"{prefix}{name}.")
        else:
            found[prefix + name] = value
    return found


def describe(config: ml_collections.ConfigDict) -> str:
    """Every key of `config` as `key = value  # what it means`, aligned: what `train.py --print_config` prints."""
    values = {key: repr(tuple(value) if isinstance(value, list) else value) for key, value in leaves(config).items()}
    width = max(len(f"{key} = {value}") for key, value in values.items() if len(value) <= 40)
    lines = []
    for key, value in values.items():
        setting = f"{key} = {value}"
        lines.append(f"{setting.ljust(width)}  # {KEY_HELP[key]}" if key in KEY_HELP else setting)
    return "\n".join(lines)


def reference() -> str:
    """docs/config.md: every key, its default and what it means."""
    rows = [f"| `{key}` | `{value!r}` | {KEY_HELP[key]} |" for key, value in leaves(base_config()).items()]
    header = [
        "# Config keys",
        "",
        "Every key of `base_config()` (diffjax/config.py), its default and what it means. Override any with",
        "`--config.KEY=VALUE`; `python train.py --print_config [--config=...]` prints the resolved config of a run.",
        "Paper configs change the defaults as `paper_config()` says. Regenerate this file with",
        "`python -c 'from diffjax.config import reference; print(reference())' > docs/config.md`.",
        "",
        "| key | default | meaning |",
        "|---|---|---|",
    ]
    return "\n".join(header + rows)


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
        ("model.vocab_multiple", model.vocab_multiple),
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

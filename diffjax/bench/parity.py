"""Training parity with Hugging Face transformers: one initialisation, the same batches and optimizer, step by step.

transformers initialises `DiffLlamaForCausalLM` (diff, and its GQA variant) or `LlamaForCausalLM`
(standard); diffjax imports it through `convert.import_hf`, the path `python -m diffjax.convert import` takes.
Both then train in float32 on the same packed batches of the project's pipeline: each document attends only
to itself at its own positions (for transformers a 4-D additive mask and `position_ids`), the loss is the
mean cross entropy over the kept tokens, and the optimizer is diffjax's (global-norm clipping, then AdamW
with its schedule and weight decay on projection and embedding matrices only), rebuilt in torch.

Used by `python -m diffjax.bench parity` and tests/convert/test_hf_training.py; needs the `hf` extra.
"""

import dataclasses
import os
import tempfile

import jax
import ml_collections
import numpy as np

from diffjax import files
from diffjax.cli import UsageError
from diffjax.config import model_config, validate
from diffjax.convert.hf import hf_config, import_hf
from diffjax.convert.params import to_state
from diffjax.convert.runs import IMPORTED_FIELDS
from diffjax.data.pipeline import Batch, eval_batches, make_dataset
from diffjax.data.tokenizer import load_tokenizer
from diffjax.evaluate.results import format_table
from diffjax.parallel.mesh import make_mesh
from diffjax.train.loop import evaluate
from diffjax.train.optimizer import learning_rate_schedule
from diffjax.train.state import global_batch, make_trainer, state_from_params

# name -> model settings over the config's; transformers has no per-head norm gain, so neither may diffjax here.
VARIANTS = {
    "diff": dict(attention_type="diff"),
    "diff_gqa": dict(attention_type="diff", num_kv_heads=1),  # 2 differential heads share one key/value head
    "standard": dict(attention_type="standard"),
}
EVAL_TOLERANCE = 1e-5  # absolute, on the step-0 validation loss
LOSS_TOLERANCE = 1e-5  # relative, on each of the first CHECKED_STEPS training losses
CHECKED_STEPS = 10


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """Step-0 validation loss and the training loss of every step (step 1 first)."""

    eval_loss: float
    losses: list[float]


@dataclasses.dataclass(frozen=True)
class Comparison:
    variant: str
    diffjax: Trajectory
    transformers: Trajectory
    learning_rates: list[float]

    @property
    def eval_difference(self) -> float:
        return abs(self.diffjax.eval_loss - self.transformers.eval_loss)

    def relative_differences(self) -> np.ndarray:
        ours, theirs = np.array(self.diffjax.losses), np.array(self.transformers.losses)
        return np.abs(ours - theirs) / np.abs(theirs)

    @property
    def passed(self) -> bool:
        checked = self.relative_differences()[:CHECKED_STEPS]
        return self.eval_difference <= EVAL_TOLERANCE and bool(np.all(checked <= LOSS_TOLERANCE))


def variant_config(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    """`config` with `variant`'s model, in float32, without the per-head gain (the Hugging Face layout)."""
    if variant not in VARIANTS:
        raise UsageError(f"variant {variant!r} is unknown; choose from {list(VARIANTS)}")
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.update(VARIANTS[variant] | dict(subln_affine=False, dtype="float32", param_dtype="float32"))
    validate(config)
    return config


def compare(config: ml_collections.ConfigDict, variant: str, steps: int) -> Comparison:
    """Train `variant` of `config` for `steps` steps in both frameworks from transformers' initialisation."""
    config = variant_config(config, variant)
    tokenizer = load_tokenizer(config.data.tokenizer)
    validation = eval_batches(config, tokenizer)
    iterator = iter(make_dataset(config, tokenizer, "train"))
    try:
        batches = [next(iterator) for _ in range(steps)]
    finally:
        iterator.close()
    model, params = _transformers_model(config)
    schedule = learning_rate_schedule(config)
    return Comparison(
        variant,
        _train_diffjax(config, params, batches, validation),
        _train_transformers(config, model, batches, validation),
        [float(schedule(step)) for step in range(steps)],
    )


def _torch():
    try:
        import torch
        import transformers
    except ImportError as error:
        raise UsageError(f"training parity needs the hf extra (pip install -e '.[hf]'): {error}") from error
    return torch, transformers


def _transformers_model(config: ml_collections.ConfigDict):
    """transformers' own initialisation of the model, and the diffjax parameters imported from its files."""
    torch, transformers = _torch()
    cfg = model_config(config)
    values = hf_config(cfg, max_position_embeddings=config.seq_len)
    hf_model_config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(config.seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_model_config, attn_implementation="eager")
    transformers.utils.logging.disable_progress_bar()  # save_pretrained's shard-writing bar
    try:
        with tempfile.TemporaryDirectory() as directory:
            model.save_pretrained(directory)
            imported_cfg, params = import_hf(files.path(directory))
    finally:
        transformers.utils.logging.enable_progress_bar()
    for field in IMPORTED_FIELDS:
        read, wanted = getattr(imported_cfg, field), getattr(cfg, field)
        if read != wanted:
            raise AssertionError(f"the import read {field}={read!r} where the model has {wanted!r}")
    return model.train(), params


def _train_diffjax(config: ml_collections.ConfigDict, params, batches: list[Batch], validation: list[Batch]):
    trainer = make_trainer(config, make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    state = state_from_params(trainer, to_state(params, model_config(config)))
    eval_loss = evaluate(trainer, state.params, validation)
    losses = []
    for batch in batches:
        state, metrics = trainer.train_step(state, global_batch(batch, trainer.batch_sharding))
        losses.append(float(metrics["loss"]))
    return Trajectory(eval_loss, losses)


def _train_transformers(config: ml_collections.ConfigDict, model, batches: list[Batch], validation: list[Batch]):
    torch, _ = _torch()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear | torch.nn.Embedding)}
    parameters = list(model.parameters())  # a tied LM head is the embedding, listed once
    groups = [
        {"params": [p for p in parameters if id(p) in decayed], "weight_decay": config.weight_decay},
        {"params": [p for p in parameters if id(p) not in decayed], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(config.adam_b1, config.adam_b2), eps=config.adam_eps)
    schedule = learning_rate_schedule(config)

    def loss_sums(batch: Batch):
        segments = torch.from_numpy(np.asarray(batch["segment_ids"]))
        length = segments.shape[1]
        allowed = (
            torch.ones(length, length, dtype=torch.bool).tril()
            & (segments[:, :, None] == segments[:, None, :])
            & (segments != 0)[:, :, None]
        )
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
        logits = model(
            input_ids=torch.from_numpy(np.asarray(batch["inputs"], np.int64)),
            attention_mask=mask,
            position_ids=torch.from_numpy(np.asarray(batch["positions"], np.int64)),
        ).logits.float()
        targets = torch.from_numpy(np.asarray(batch["targets"], np.int64))
        kept = torch.from_numpy(np.asarray(batch["loss_mask"], np.float32))
        cross_entropy = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        return (cross_entropy * kept.flatten()).sum(), kept.sum()

    with torch.no_grad():
        totals = [loss_sums(batch) for batch in validation]
    eval_loss = float(sum(t[0] for t in totals) / max(float(sum(t[1] for t in totals)), 1.0))
    losses = []
    for step, batch in enumerate(batches):
        loss_sum, count = loss_sums(batch)
        loss = loss_sum / torch.clamp(count, min=1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():  # optax.clip_by_global_norm: scale by max_norm / norm once the norm reaches it
            norm = torch.sqrt(sum(torch.sum(p.grad * p.grad) for p in parameters if p.grad is not None))
            if norm >= config.grad_clip_norm:
                for p in parameters:
                    if p.grad is not None:
                        p.grad.mul_(config.grad_clip_norm / norm)
        for group in optimizer.param_groups:
            group["lr"] = float(schedule(step))  # optax evaluates the schedule at the update count, from 0
        optimizer.step()
        losses.append(loss.item())
    return Trajectory(eval_loss, losses)


def report(comparisons: list[Comparison]) -> str:
    """A per-step table of the losses of every variant, and a verdict line per variant."""
    steps = len(comparisons[0].diffjax.losses)
    header = ["step", "learning rate"]
    for c in comparisons:
        header += [f"{c.variant} diffjax", f"{c.variant} transformers", f"{c.variant} rel. diff"]
    rows = [["0 (eval)", "-"]]
    for c in comparisons:
        rows[0] += [f"{c.diffjax.eval_loss:.6f}", f"{c.transformers.eval_loss:.6f}", f"{c.eval_difference:.1e} abs"]
    for step in range(steps):
        row = [str(step + 1), f"{comparisons[0].learning_rates[step]:.3g}"]
        for c in comparisons:
            row += [f"{c.diffjax.losses[step]:.6f}", f"{c.transformers.losses[step]:.6f}"]
            row.append(f"{c.relative_differences()[step]:.1e}")
        rows.append(row)
    lines = [format_table(header, rows), ""]
    for c in comparisons:
        checked = c.relative_differences()[:CHECKED_STEPS]
        lines.append(
            f"{c.variant}: {'passed' if c.passed else 'FAILED'}: step-0 validation loss differs by "
            f"{c.eval_difference:.1e} (tolerance {EVAL_TOLERANCE:g}), steps 1-{len(checked)} by at most "
            f"{checked.max():.1e} relative (tolerance {LOSS_TOLERANCE:g}), all {steps} steps by at most "
            f"{c.relative_differences().max():.1e}"
        )
    return "\n".join(lines)

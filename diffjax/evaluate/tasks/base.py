"""What every evaluation task receives and returns, so the CLI can run any of them the same way."""

import dataclasses
from typing import Any

import ml_collections
from etils import epath

from diffjax.data.tokenizer import Tokenizer
from diffjax.evaluate.generate import GREEDY, Sampling
from diffjax.evaluate.load import LoadedModel
from diffjax.model import parameter_count


@dataclasses.dataclass(frozen=True)
class NeedleGrid:
    """The multi-needle retrieval grid: context lengths (bytes of text) x depths x (N needles, R queries)."""

    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    counts: tuple[tuple[int, int], ...]
    documents: int  # per cell
    batch_size: int  # documents per forward pass


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    prompts: tuple[str, ...] = ()  # empty: the run's `sample_prompt`
    max_tokens: int = 64
    sampling: Sampling = GREEDY
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class HarnessOptions:
    """lm-evaluation-harness: its task names, few-shot examples (None: each task's default), items per task
    (None: all), a directory of the user's own task YAMLs, and sequences per forward pass."""

    tasks: tuple[str, ...] = ()
    num_fewshot: int | None = None
    limit: int | None = None
    include_path: str = ""
    batch_size: int = 16


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    split: str  # perplexity and outliers: the data split
    batches: int  # perplexity: batches of the split (0: the run's eval_batches; fewer when the split is shorter)
    needles: NeedleGrid  # needles, attention (and the needle question of generate)
    map_layer: int = -1  # attention: the layer (negative: from the last) and head of the map figure
    map_head: int = 0
    outlier_batches: int = 2  # outliers: batches of the split
    generation: GenerationOptions = GenerationOptions()
    harness: HarnessOptions = HarnessOptions()


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """One checkpoint under evaluation; tasks write their figures (PNG) into `out`."""

    model: LoadedModel
    config: ml_collections.ConfigDict
    tokenizer: Tokenizer
    options: EvalOptions
    out: epath.Path  # a local scratch directory, moved into place when every task is done
    run_name: str

    def title(self, what: str) -> str:
        """A figure title naming the run, so figures from several runs cannot be mixed up."""
        return f"{what}\n{self.run_name} ({self.config.model.attention_type}), step {self.model.step}"


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """`figures` go to results.json; `summary` (metric -> formatted value) and `tables` are printed."""

    figures: dict[str, Any]
    summary: dict[str, str]
    tables: tuple[str, ...] = ()


def model_summary(model: LoadedModel, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The facts a reader of results.json needs to tell runs apart."""
    m = config.model
    return {
        "attention_type": m.attention_type,
        "parameters": parameter_count(model.params, model.module.cfg),
        "num_layers": m.num_layers,
        "emb_dim": m.emb_dim,
        "num_heads": m.num_heads,
        "num_kv_heads": m.num_kv_heads,
        "vocab_size": m.vocab_size,
        "seq_len": config.seq_len,
        "tokenizer": config.data.tokenizer,
        "data": config.data.mixture or config.data.source,
    }

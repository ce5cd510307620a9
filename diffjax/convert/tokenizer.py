"""A run's tokenizer in Hugging Face form, so that `AutoTokenizer.from_pretrained(exported)` works beside the model.

- byte-level: a `tokenizer.json` built here whose ids are diffjax's exactly (`<|pad|>` 0, `<|bos|>` 1,
  `<|eos|>` 2, byte b at b + 3: a BPE without merges over GPT-2's byte alphabet);
- a `tokenizer.json`: the file itself;
- SentencePiece: the model as `tokenizer.model`, read by transformers' `LlamaTokenizer` with no prefix space
  and identity normalisation, as diffjax reads it (one difference: a literal U+2581 in the text, which diffjax
  spells in byte pieces and the Llama tokenizer reads as a space).

Encoding with special tokens (transformers' default) starts the ids with BOS, as every diffjax document
and prompt starts: `tokenizer(text)` is what the model saw in training, and so is what lm-evaluation-harness's
`hf` model feeds it. `tokenizer_config.json` names BOS/EOS/PAD; `generation_config.json` carries the same
ids. Import reads the tokenizer back from `tokenizer.json`, else `tokenizer.model`.
"""

import json
from typing import TYPE_CHECKING

from etils import epath

from diffjax.config import ConfigError
from diffjax.convert.layout import ConversionError
from diffjax.data.tokenizer import (
    HF_CONFIG,
    HF_FILE,
    HF_SPECIAL,
    ByteTokenizer,
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)

if TYPE_CHECKING:
    import tokenizers

SENTENCEPIECE_FILE = "tokenizer.model"


def _roles(tokenizer: Tokenizer) -> dict[str, int]:
    return {"pad": tokenizer.pad_id, "bos": tokenizer.bos_id, "eos": tokenizer.eos_id}


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """`pad_token_id`, `bos_token_id`, `eos_token_id`, as Hugging Face configs name them."""
    return {f"{role}_token_id": token_id for role, token_id in _roles(tokenizer).items()}


def run_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer a run was trained with (`data.tokenizer` of its config), or a one-line `ConversionError`."""
    try:
        return load_tokenizer(spec)
    except ConfigError as error:
        raise ConversionError(
            f"the run's tokenizer (data.tokenizer={spec!r}) cannot be read: {error}; export from the directory "
            "the run was trained in"
        ) from None


def export_tokenizer(directory: epath.Path, tokenizer: Tokenizer, max_length: int) -> None:
    """Write `tokenizer` into `directory` with `tokenizer_config.json` and `generation_config.json`."""
    roles = _roles(tokenizer)
    if isinstance(tokenizer, ByteTokenizer | HuggingFaceTokenizer):
        source = byte_tokenizer() if isinstance(tokenizer, ByteTokenizer) else tokenizer.tokenizer
        names = {role: source.id_to_token(i) for role, i in roles.items()}
        (directory / HF_FILE).write_text(with_bos(source, names["bos"], tokenizer.bos_id).to_str(pretty=True))
        tokenizer_class = "PreTrainedTokenizerFast"
    else:
        (directory / SENTENCEPIECE_FILE).write_bytes(tokenizer.path.read_bytes())
        names = {role: tokenizer.processor.id_to_piece(i) for role, i in roles.items()}
        tokenizer_class = "LlamaTokenizer"
    config = {
        "tokenizer_class": tokenizer_class,
        **{f"{role}_token": name for role, name in names.items()},
        "add_bos_token": True,
        "add_eos_token": False,
        "split_special_tokens": True,  # "<|eos|>" in a text is text, as diffjax encodes it
        "model_max_length": max_length,
    }
    if isinstance(tokenizer, SentencePieceTokenizer):
        config |= {"legacy": False, "add_prefix_space": False}
    (directory / HF_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    generation = special_ids(tokenizer) | {"do_sample": False}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def with_bos(tokenizer: "tokenizers.Tokenizer", bos: str, bos_id: int) -> "tokenizers.Tokenizer":
    """A copy of `tokenizer` whose encodings with special tokens start with BOS (ids unchanged otherwise)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import processors

    copy = HFTokenizer.from_str(tokenizer.to_str())
    copy.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    return copy


def byte_tokenizer() -> "tokenizers.Tokenizer":
    """diffjax's byte tokenizer as a Hugging Face tokenizer: the same ids, lossless on any text."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = _bytes_to_characters()
    vocab = {name: i for i, name in enumerate(HF_SPECIAL)}
    vocab |= {alphabet[b]: b + ByteTokenizer.offset for b in range(256)}
    tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(HF_SPECIAL))
    return tokenizer


def _bytes_to_characters() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, the alphabet of byte-level tokenizers."""
    from tokenizers import pre_tokenizers

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    mapping = {b: chr(b) if b in printable else chr(next(shifted)) for b in range(256)}
    assert set(mapping.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    return mapping


def import_tokenizer(source: epath.Path, directory: epath.Path) -> tuple[str, Tokenizer] | None:
    """Copy `source`'s tokenizer into `directory` (`tokenizer.json` first, else `tokenizer.model`, with its
    `tokenizer_config.json`) once it has been read; its file name and the tokenizer, or None when there is none."""
    for name in (HF_FILE, SENTENCEPIECE_FILE):
        if (source / name).is_file():
            tokenizer = run_tokenizer(str(source / name))  # refused here, before anything is copied
            for copied in (name, HF_CONFIG):
                if (source / copied).is_file():
                    (directory / copied).write_bytes((source / copied).read_bytes())
            return name, tokenizer
    return None

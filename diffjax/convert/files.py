"""Reading and writing safetensors directories (single file or sharded with an index), all or nothing.

NumPy only: torch is never imported. bfloat16 is `ml_dtypes.bfloat16` (what JAX uses), which
`safetensors.numpy` writes but does not read back, so reading decodes the raw buffers itself.
"""

import contextlib
import json
from collections.abc import Iterator

import ml_dtypes
import numpy as np
from etils import epath

from diffjax import files
from diffjax.convert.layout import ConversionError, Params

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# safetensors dtype codes -> NumPy, for the float types a checkpoint's weights come in.
_STORED = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


def _safetensors():
    try:
        import huggingface_hub  # noqa: F401  (shards)
        import safetensors
        import safetensors.numpy
    except ImportError as error:
        raise ConversionError(f"converting weights needs the hf extra (pip install -e '.[hf]'): {error}") from None
    return safetensors


@contextlib.contextmanager
def staged(out: epath.Path, last: str) -> Iterator[epath.Path]:
    """A local scratch directory that becomes `out` only when the block succeeds (`files.staged`, the file
    `last` uploaded last to a gs:// `out`); `out` must be new or empty, so an error leaves nothing behind."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"--out={out} already exists; give a new directory")
    try:
        with files.staged(out, last=last) as scratch:
            yield scratch
    except BaseException:
        if files.is_remote(out):
            files.remove_tree(out)  # objects uploaded (or saved there directly) before the failure
        raise


def write_safetensors(directory: epath.Path, tensors: Params, max_shard_size: int | str) -> None:
    """`model.safetensors`, or shards `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`
    (Hugging Face's naming, split by huggingface_hub) when the tensors exceed `max_shard_size` bytes."""
    safetensors = _safetensors()
    from huggingface_hub import split_state_dict_into_shards_factory

    try:
        split = split_state_dict_into_shards_factory(
            tensors,
            get_storage_size=lambda array: array.nbytes,
            filename_pattern="model{suffix}.safetensors",
            max_shard_size=max_shard_size,
        )
    except ValueError as error:
        raise ConversionError(f"--max_shard_size={max_shard_size!r} is not a size such as 5GB: {error}") from None
    for filename, names in split.filename_to_tensors.items():
        # transformers refuses safetensors files without this metadata
        safetensors.numpy.save_file({name: tensors[name] for name in names}, directory / filename, {"format": "pt"})
        files.open_permissions(directory / filename)  # safetensors writes through a 0600 temporary file
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def read_safetensors(directory: epath.Path) -> Params:
    """Every tensor of a directory's `model.safetensors` or of the shards its index lists."""
    safetensors = _safetensors()
    if (directory / INDEX).is_file():
        shards = sorted(set(json.loads((directory / INDEX).read_text())["weight_map"].values()))
    elif (directory / SINGLE).is_file():
        shards = [SINGLE]
    else:
        raise ConversionError(f"{directory} holds neither {SINGLE} nor {INDEX}")
    tensors = {}
    for filename in shards:
        if not (directory / filename).is_file():
            raise ConversionError(f"{directory / filename} is missing (listed in {INDEX})")
        for name, view in safetensors.deserialize((directory / filename).read_bytes()):
            if view["dtype"] not in _STORED:
                raise ConversionError(f"tensor {name} is stored as {view['dtype']}; weights must be floating point")
            tensors[name] = np.frombuffer(view["data"], _STORED[view["dtype"]]).reshape(view["shape"])
    return tensors


def read_json(path: epath.Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path} is not valid JSON: {error}") from None


def write_json(path: epath.Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")

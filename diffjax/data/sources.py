"""Text sources by name: our own TFDS builders (built on first use) or any dataset prepared in the data dir,
which may be on Cloud Storage (`gs://...`; read through a local copy).

Every source is read through `tfds` array_record data sources (no TensorFlow) and handed on as a grain
`MapDataset` of `str` documents.
"""

import os
from collections.abc import Iterator

import grain
import jax
import ml_collections
import tensorflow_datasets as tfds

from diffjax import files
from diffjax.config import ConfigError, parse_mixture
from diffjax.data import builders
from diffjax.parallel.mesh import barrier

OWN_SOURCES = ("diffjax_corpus", "text_files", "needles")


def _builder(name: str, data: ml_collections.ConfigDict, data_dir: str) -> tfds.core.DatasetBuilder:
    if name == "diffjax_corpus":
        return builders.corpus_builder(data_dir)
    if name == "text_files":
        return builders.text_files_builder(data.files, data.validation_fraction, data.text_field, data_dir)
    if name == "needles":
        return builders.needles_builder(data.needles.to_dict(), data_dir)
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ConfigError(
            f"data.source={name!r} is unknown: not one of {', '.join(OWN_SOURCES)} and not a TFDS dataset"
        ) from None


def _check_prepared(name: str, builder: tfds.core.DatasetBuilder, data_dir: str) -> None:
    if name not in OWN_SOURCES and not builder.is_prepared():
        local = "LOCAL_DIR" if files.is_remote(data_dir) else data_dir
        then = f" (then copy LOCAL_DIR to {data_dir})" if files.is_remote(data_dir) else ""
        raise ConfigError(
            f"data.source={name!r} is not prepared in {data_dir}; prepare it once on a machine with network access: "
            f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='{local}', "
            f"file_format='array_record').download_and_prepare()\"{then} (or tpu_setup/prepare_data.sh)"
        )


def _local_builder(name: str, data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The builder to read from: in `data_dir`, or for a gs:// data_dir in its copy under `cache_dir`.

    array_record files are read from a local disk only, so a dataset prepared on Cloud Storage is copied
    down whole the first time a host reads it (into a scratch directory renamed into place: never half).
    """
    if not files.is_remote(data.data_dir):
        data_dir = os.fspath(files.path(data.data_dir))
        builder = _builder(name, data, data_dir)
        _check_prepared(name, builder, data_dir)
        return builder
    remote = _builder(name, data, data.data_dir)
    local = _builder(name, data, _cache_of(data))
    if not local.is_prepared():
        _check_prepared(name, remote, data.data_dir)
        if remote.is_prepared():
            with files.staged(local.data_dir) as scratch:
                files.download_tree(remote.data_dir, scratch)
            local = _builder(name, data, _cache_of(data))  # sees the copy
    return local


def _cache_of(data: ml_collections.ConfigDict) -> str:
    """Where a gs:// data dir's datasets are copied: `cache_dir/<bucket>/<path>`."""
    return os.fspath(files.path(data.cache_dir) / data.data_dir.removeprefix("gs://").strip("/"))


def _prepared_builder(name: str, data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """Build on first use: process 0 first, then the others find it ready (shared disk or bucket) or build
    their own. A dataset built for a gs:// data dir is uploaded there (its `dataset_info.json` last, which
    TFDS takes as "prepared") for other hosts and later runs."""
    first = jax.process_index() == 0
    if not first:
        barrier(f"prepared {name}")
    builder = _local_builder(name, data)  # made after process 0's build, so it sees the finished dataset
    if not builder.is_prepared():
        builder.download_and_prepare()
        if files.is_remote(data.data_dir) and first:
            remote = _builder(name, data, data.data_dir)
            files.upload_tree(builder.data_dir, remote.data_dir, last="dataset_info.json")
    if first:
        barrier(f"prepared {name}")
    return builder


def _split_name(name: str, split: str, data: ml_collections.ConfigDict) -> str:
    return data.validation_split if split == "validation" and name not in OWN_SOURCES else split


def open_split(name: str, data: ml_collections.ConfigDict, split: str) -> grain.MapDataset:
    """The documents of one source's split as a `MapDataset[str]`, building our own datasets on first use."""
    builder = _prepared_builder(name, data)
    split = _split_name(name, split, data)
    if split not in builder.info.splits and name == "text_files":
        raise ConfigError(
            f"data.files yields no {split} documents at data.validation_fraction={data.validation_fraction}; raise it"
        )
    if split not in builder.info.splits:
        raise ConfigError(f"data.source={name!r} has no {split!r} split; it has {sorted(builder.info.splits)}")
    field = "text" if name in OWN_SOURCES else data.text_field
    if field not in builder.info.features:
        raise ConfigError(f"data.source={name!r} has no {field!r} feature; set data.text_field to one of its features")
    source = builder.as_data_source(split=split)
    return grain.MapDataset.source(source).map(lambda record: _as_text(record[field]))


def _as_text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def training_texts(data: ml_collections.ConfigDict) -> Iterator[str]:
    """Every training document of the configured source(s), in order (for training a tokenizer)."""
    for name, _ in parse_mixture(data):
        yield from open_split(name, data, "train")

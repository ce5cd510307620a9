import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import REPO, load_config

from diffjax.config import ConfigError
from diffjax.data.sources import open_split, training_texts


def _data(tmp_path, **values):
    data = load_config(REPO / "configs" / "tiny.py").data
    data.update(data_dir=str(tmp_path / "tfds"), **values)
    return data


def test_embedded_corpus_is_built_once_with_fixed_splits(tmp_path):
    data = _data(tmp_path)
    train, validation = open_split("diffjax_corpus", data, "train"), open_split("diffjax_corpus", data, "validation")
    assert (len(train), len(validation)) == (74, 5)
    assert not set(train) & set(validation)
    built = list((tmp_path / "tfds" / "diffjax_corpus").rglob("*.array_record*"))
    assert built
    stamps = [p.stat().st_mtime_ns for p in built]
    open_split("diffjax_corpus", data, "train")
    assert [p.stat().st_mtime_ns for p in built] == stamps  # reused, not rebuilt


def test_text_files_read_txt_md_and_jsonl_and_rebuild_when_files_change(tmp_path):
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "b.md").write_text("# second\n\nfile")
    (tmp_path / "c.jsonl").write_text('{"text": "line one"}\n\n{"text": "line two", "id": 3}\n')
    files = f"{tmp_path}/*.txt,{tmp_path}/*.md,{tmp_path / 'c.jsonl'}"
    data = _data(tmp_path, source="text_files", files=files, validation_fraction=0.0)
    assert sorted(open_split("text_files", data, "train")) == ["# second\n\nfile", "first file", "line one", "line two"]
    (tmp_path / "a.txt").write_text("first file, edited")
    assert "first file, edited" in list(open_split("text_files", data, "train"))
    assert sorted(training_texts(data))[0] == "# second\n\nfile"


def test_text_files_validation_fraction_holds_out_documents(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(f'{{"text": "document {i}"}}\n' for i in range(200)))
    data = _data(tmp_path, files=str(tmp_path / "d.jsonl"), validation_fraction=0.2)
    train, validation = (
        list(open_split("text_files", data, "train")),
        list(open_split("text_files", data, "validation")),
    )
    assert len(train) + len(validation) == 200 and 20 <= len(validation) <= 60
    assert not set(train) & set(validation)


@pytest.mark.parametrize(
    "write,message",
    [
        (None, "no file matches"),
        (lambda p: p.write_text(""), "holds no training text"),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0"), "looks binary"),
        (lambda p: p.write_bytes(b"caf\xe9 au lait " * 10), "is not UTF-8 text"),
    ],
    ids=["missing", "empty", "binary", "latin1"],
)
def test_bad_text_files_are_named_in_one_line(tmp_path, write, message):
    path = tmp_path / "corpus.txt"
    if write:
        write(path)
    with pytest.raises(ConfigError, match=message) as error:
        open_split("text_files", _data(tmp_path, files=str(path)), "train")
    assert "\n" not in str(error.value)


def test_jsonl_without_the_text_field_is_rejected(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(ConfigError, match=r"x\.jsonl:1 is not a JSON object with a 'text' field"):
        open_split("text_files", _data(tmp_path, files=str(tmp_path / "x.jsonl")), "train")


def test_needle_documents_carry_prompts_and_answers(tmp_path):
    data = _data(tmp_path)
    data.needles.update(context_length=600, num_needles=2, num_queries=2, num_train=8, num_validation=4)
    texts = list(open_split("needles", data, "validation"))
    assert len(texts) == 4 and all(text.count("The magic number for") == 4 for text in texts)
    assert all(len(text.encode()) <= 600 for text in texts)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--config.data.files=/no/such/file.txt"], "no file matches '/no/such/file.txt'"),
        (["--config.data.files={tmp}/empty.txt"], "holds no training text"),
        (["--config.data.files={tmp}/binary.txt"], "looks binary"),
    ],
)
def test_train_cli_reports_bad_corpora_with_exit_code_2(tmp_path, flags, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)))
    command = [sys.executable, "train.py", "--config.data.source=text_files", f"--config.data.data_dir={tmp_path}/d"]
    command += [flag.format(tmp=tmp_path) for flag in flags] + [f"--config.workdir={tmp_path}/run"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


class ToyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Stands in for a dataset someone prepared with `tfds build` (lm1b, c4, ...)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict(
            {"sentence": tfds.features.Text(), "label": tfds.features.Scalar(np.int64)}
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(6), "test": self._generate_examples(2)}

    def _generate_examples(self, count):
        for i in range(count):
            yield i, {"sentence": f"sentence {i}", "label": i}


def test_a_dataset_prepared_in_the_data_dir_is_read_by_name(tmp_path):
    ToyText(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    data = _data(tmp_path, text_field="sentence", validation_split="test")
    assert sorted(open_split("toy_text", data, "train")) == [f"sentence {i}" for i in range(6)]
    assert sorted(open_split("toy_text", data, "validation")) == ["sentence 0", "sentence 1"]
    with pytest.raises(ConfigError, match=r"has no 'text' feature; set data\.text_field"):
        open_split("toy_text", _data(tmp_path), "train")

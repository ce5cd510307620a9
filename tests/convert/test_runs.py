"""Run directories in and out: export from a checkpoint, import to a checkpoint that fine-tuning starts from,
and the command line's refusals (one line, exit code 2, nothing written)."""

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, load_config, save_run

import diffjax
from diffjax.config import ConfigError, model_config
from diffjax.convert.hf import hf_config
from diffjax.convert.layout import ConversionError
from diffjax.convert.params import flat_params
from diffjax.convert.runs import export_run, import_run
from diffjax.data.corpus import python_docs
from diffjax.data.tokenizer import ByteTokenizer, load_tokenizer, train_bpe, train_sentencepiece
from diffjax.parallel.mesh import make_mesh
from diffjax.train.checkpoint import find_checkpoint, restore_params
from diffjax.train.state import make_trainer

from .models import assert_same_params

pytest.importorskip("safetensors")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run with a checkpoint at step 7 (untied, GQA, per-head gain 1.5^7, not ones) and its HF export."""
    workdir = tmp_path_factory.mktemp("run")
    save_run(workdir, [7], model={"num_layers": 3, "tie_embeddings": False})
    hf = export_run(workdir, workdir.parent / "hf", "hf")
    return workdir, hf


def test_an_imported_run_is_the_exported_one_and_fine_tuning_starts_from_it(run, tmp_path):
    workdir, hf = run
    out = import_run(hf, tmp_path / "imported")
    model, config = diffjax.load_model(out)
    original, _ = diffjax.load_model(workdir)
    assert model.step == 0 and not config.model.subln_affine  # the gain is folded into o_proj
    ids = np.arange(24, dtype=np.int32).reshape(2, 12)
    np.testing.assert_allclose(model(ids), original(ids), rtol=0, atol=1e-5)

    # The written config file is what train.py reads: its init_from is the imported checkpoint.
    file_config = load_config(out / "config.py")
    assert file_config.init_from == str(out.absolute()) and file_config.model.to_dict() == config.model.to_dict()
    trainer = make_trainer(file_config, make_mesh((1, -1, 1)))
    directory, step = find_checkpoint(file_config.init_from, trainer.abstract_state.params)
    restored = restore_params(directory, step, trainer.abstract_state.params)
    cfg = model_config(file_config)
    assert cfg.padded_vocab_size == 384  # imported into the run's padded layout
    assert_same_params(flat_params(restored, cfg), flat_params(model.params, cfg))


MIXED_TEXT = "naïve café — 東京 🐍🎉 👩‍👩‍👧\n\tdef f(x):  return x ** 2  # 12345 \x00"


def test_the_hf_export_is_complete_its_tokenizer_has_diffjax_ids_and_greedy_text_agrees(run, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    workdir, hf = run
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in hf.iterdir()}
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
    for text in (MIXED_TEXT, "<|eos|> is text"):
        assert tokenizer.encode(text, add_special_tokens=False) == ByteTokenizer().encode(text).tolist()
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)

    prompt, num_tokens = "The ", 12
    model = transformers.AutoModelForCausalLM.from_pretrained(hf)
    ids = tokenizer(prompt, return_tensors="pt").input_ids  # BOS first, as diffjax starts a prompt
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=num_tokens, do_sample=False)
    hf_text = prompt + tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
    command = [sys.executable, "-m", "diffjax.generate", f"--workdir={workdir}", f"--prompt={prompt}"]
    result = subprocess.run([*command, f"--max_tokens={num_tokens}"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.rsplit("\nstep ", 1)[0] == hf_text


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer_json"])
def test_trained_tokenizers_export_as_themselves_and_import_back(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / ("tok.model" if kind == "sentencepiece" else "tok.json")
    (train_sentencepiece if kind == "sentencepiece" else train_bpe)(python_docs("train"), 600, path)
    config = load_config(REPO / "configs" / "tiny.py")
    config.data.tokenizer = str(path)
    save_run(tmp_path / "run", [1], model={"vocab_size": 640}, data=config.data)
    hf = export_run(tmp_path / "run", tmp_path / "hf", "hf")
    ours = load_tokenizer(str(path))
    theirs = transformers.AutoTokenizer.from_pretrained(hf)
    assert theirs.encode(MIXED_TEXT, add_special_tokens=False) == ours.encode(MIXED_TEXT).tolist()
    assert (theirs.pad_token_id, theirs.bos_token_id, theirs.eos_token_id) == (ours.pad_id, ours.bos_id, ours.eos_id)
    assert theirs(MIXED_TEXT).input_ids == [ours.bos_id, *ours.encode(MIXED_TEXT).tolist()]
    spelled = f"a {theirs.eos_token} b"  # a special token's spelling is text to both
    assert theirs.encode(spelled, add_special_tokens=False) == ours.encode(spelled).tolist()
    assert json.loads((hf / "config.json").read_text())["vocab_size"] == 640

    imported = load_config(import_run(hf, tmp_path / "imported") / "config.py")
    back = load_tokenizer(imported.data.tokenizer)
    assert Path(imported.data.tokenizer).parent == (tmp_path / "imported").absolute()
    np.testing.assert_array_equal(back.encode(MIXED_TEXT), ours.encode(MIXED_TEXT))


def test_every_exported_file_is_readable_by_others_as_open_would_make_it(run, tmp_path):
    """safetensors writes through a private temporary (0600); an export is for others to read."""
    workdir, _ = run
    umask = os.umask(0o022)
    try:
        exports = [export_run(workdir, tmp_path / fmt, fmt, max_shard_size="20KB") for fmt in ("hf", "microsoft")]
    finally:
        os.umask(umask)
    files = [path for out in exports for path in Path(out).rglob("*") if path.is_file()]
    assert len([path for path in files if path.suffix == ".safetensors"]) > 2  # sharded
    assert {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in files} == {
        path.name: "0o644" for path in files
    }


def test_export_names_a_tokenizer_that_is_gone(tmp_path):
    config = load_config(REPO / "configs" / "tiny.py")
    config.data.tokenizer = str(tmp_path / "gone.model")
    save_run(tmp_path / "run", [1], data=config.data)
    with pytest.raises(ConversionError, match=r"the run's tokenizer \(data.tokenizer=.*gone.model'\) cannot be read"):
        export_run(tmp_path / "run", tmp_path / "hf", "hf")
    assert not (tmp_path / "hf").exists()


def test_microsoft_round_trip_of_a_run_is_bit_exact_and_keeps_the_gain(run, tmp_path):
    workdir, _ = run
    export_run(workdir, tmp_path / "ms", "microsoft")
    imported, config = diffjax.load_model(import_run(tmp_path / "ms", tmp_path / "back", "microsoft"))
    original, original_config = diffjax.load_model(workdir)
    assert config.model.to_dict() == original_config.model.to_dict()
    cfg = model_config(config)
    assert_same_params(flat_params(imported.params, cfg), flat_params(original.params, cfg))


def _hf_copy(hf, tmp_path, **changes):
    """A copy of the exported directory with `config.json` fields changed (None: removed)."""
    copy = shutil.copytree(hf, tmp_path / "edited")
    values = json.loads((copy / "config.json").read_text())
    values.update(changes)
    (copy / "config.json").write_text(json.dumps({k: v for k, v in values.items() if v is not None}))
    return copy


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (dict(model_type="bert"), "model_type='bert' is not supported; diffjax imports diffllama, llama"),
        (dict(num_key_value_heads=3), "num_key_value_heads=3 is odd"),
        (dict(intermediate_size=48), "tensor model.layers.0.mlp.gate_proj.weight has shape [64, 32]; this config"),
        (dict(num_hidden_layers=None), "config.json lacks the field 'num_hidden_layers'"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_type='yarn' is not supported"),
    ],
)
def test_a_bad_hf_directory_is_refused_naming_the_problem_and_nothing_is_written(run, tmp_path, edit, message):
    source = _hf_copy(run[1], tmp_path, **edit)
    with pytest.raises(ConversionError, match=re.escape(message)):
        import_run(source, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited"]


def test_missing_files_and_impossible_exports_are_refused(run, tmp_path):
    workdir, hf = run
    source = shutil.copytree(hf, tmp_path / "no_weights")
    (source / "model.safetensors").unlink()
    with pytest.raises(ConversionError, match=r"holds neither model\.safetensors nor model\.safetensors\.index\.json"):
        import_run(source, tmp_path / "out")
    (source / "config.json").unlink()
    with pytest.raises(ConversionError, match=r"config\.json is missing"):
        import_run(source, tmp_path / "out")
    with pytest.raises(ConversionError, match="already exists"):
        export_run(workdir, hf, "hf")
    with pytest.raises(ConfigError, match="no checkpoint at"):
        export_run(tmp_path / "nothing", tmp_path / "out", "hf")
    with pytest.raises(ConversionError, match="--max_shard_size='lots' is not a size"):
        export_run(workdir, tmp_path / "out", "hf", max_shard_size="lots")  # fails while writing
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    with pytest.raises(ConversionError, match="transformers has no class for attention_type='diff_v2'"):
        hf_config(model_config(load_config(REPO / "configs" / "tiny.py", "diff_v2")))


def _convert(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "diffjax.convert", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_cli_exports_and_refuses_bad_input_with_one_line(run, tmp_path):
    workdir, hf = run
    result = _convert(
        "export", f"--workdir={workdir}", "--format=microsoft", "--dtype=bfloat16", f"--out={tmp_path / 'ms'}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "ms" / "model.safetensors").is_file() and (tmp_path / "ms" / "args.json").is_file()

    source = _hf_copy(hf, tmp_path, num_key_value_heads=3)
    result = _convert("import", f"--hf={source}", f"--out={tmp_path / 'imported'}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m diffjax.convert: error: num_key_value_heads=3 is odd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited", "ms"]

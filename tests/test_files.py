"""Paths local or gs:// and writes never half-done, in this process against the loopback Cloud Storage server."""

import os

import pytest

from diffjax import files
from diffjax.config import ConfigError
from diffjax.gcs_emulator import LocalGCS


@pytest.fixture
def bucket(gcs: LocalGCS, monkeypatch) -> str:
    """A fresh bucket, with gcsfs (a cached instance per process) pointed at the server for this test."""
    import gcsfs

    for name, value in gcs.env().items():
        monkeypatch.setenv(name, value)
    gcsfs.GCSFileSystem.clear_instance_cache()
    yield gcs.create_bucket(f"files-{os.getpid()}")
    gcsfs.GCSFileSystem.clear_instance_cache()


def test_paths_keep_urls_and_expand_home_for_local_ones(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert os.fspath(files.path("~/runs/a")) == str(tmp_path / "runs" / "a")
    assert os.fspath(files.path("gs://b/runs/a")) == "gs://b/runs/a" and files.is_remote("gs://b/x")
    assert not files.is_remote("runs/gs://x") and files.absolute(files.path("gs://b/x")) == files.path("gs://b/x")


def test_write_atomically_replaces_an_object_whole(gcs, bucket):
    target = files.path(f"{bucket}/dir/record.json")
    files.write_atomically(target, "first")
    files.write_atomically(target, b"second")
    assert target.read_text() == "second" and [p.name for p in target.parent.iterdir()] == ["record.json"]


def test_staged_replaces_a_remote_directory_only_when_the_block_succeeds(gcs, bucket):
    target = files.path(f"{bucket}/results")
    for name in ("old.txt", "kept.txt"):
        (target / name).write_text(name)
    with pytest.raises(RuntimeError), files.staged(target) as scratch:
        (scratch / "new.txt").write_text("new")
        raise RuntimeError("a task failed")
    assert sorted(p.name for p in target.iterdir()) == ["kept.txt", "old.txt"]  # untouched

    with files.staged(target, last="kept.txt") as scratch:
        assert not files.is_remote(scratch)
        (scratch / "kept.txt").write_text("again")
        (scratch / "sub").mkdir()
        (scratch / "sub" / "new.txt").write_text("new")
    assert sorted(os.fspath(p.relative_to(target)) for p in files.files_under(target)) == ["kept.txt", "sub/new.txt"]
    assert (target / "kept.txt").read_text() == "again"

    with files.staged(target, keep_existing=True) as scratch:
        assert (scratch / "sub" / "new.txt").read_text() == "new"  # earlier results join the new ones
        (scratch / "more.txt").write_text("more")
    assert len(files.files_under(target)) == 3


def test_move_and_remove_a_remote_tree(gcs, bucket):
    source = files.path(f"{bucket}/checkpoints/12")
    (source / "params" / "a").write_text("a")
    (source / "metadata").write_text("m")
    files.move_tree(source, files.path(f"{bucket}/checkpoints.damaged/12-1"))
    assert not source.exists()
    moved = files.path(f"{bucket}/checkpoints.damaged/12-1")
    assert (moved / "params" / "a").read_text() == "a"
    files.remove_tree(moved)
    files.remove_tree(moved)  # absent: nothing happens
    assert not moved.exists()


def test_check_access_names_the_setting_and_the_missing_bucket(gcs, bucket):
    files.check_access(f"{bucket}/run", "workdir", write=True)  # writable: passes, leaves nothing behind
    assert not files.path(f"{bucket}/run").exists()
    with pytest.raises(ConfigError, match=r"^init_from=gs://absent-bucket-x/run: bucket gs://absent-bucket-x does"):
        files.check_access("gs://absent-bucket-x/run", "init_from", write=True)
    files.check_access("relative/local/dir", "workdir", write=True)  # local paths are not probed

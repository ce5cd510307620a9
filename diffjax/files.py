"""Paths a user gives, local or in Cloud Storage, and files written for others to read.

Every path goes through `path()`: an etils `epath.Path`, which reads and writes `gs://bucket/...` through
gcsfs (the `gcs` extra) and local paths through `os`, so one code path serves both (Orbax and TFDS take
the same objects). What an object store lacks is handled here, once: there are no renames or appends, so
a file is replaced by one upload (atomic on GCS: readers see the old object or the new one), and a
directory is staged on the local disk and uploaded file by file with the file readers look for last.
Files written locally are never half-written and get the permissions a plain `open()` gives.
"""

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator

from etils import epath

from diffjax.config import ConfigError

PathLike = str | os.PathLike
REMOTE_PREFIXES = ("gs://",)


def is_remote(value: PathLike) -> bool:
    """Whether `value` names an object store (`gs://...`) rather than the local filesystem."""
    return os.fspath(value).startswith(REMOTE_PREFIXES)


def path(value: PathLike) -> epath.Path:
    """The `epath.Path` of a path a user gave: `~` expanded for local paths, `gs://` kept as a URL."""
    if is_remote(value):
        _require_gcsfs()
        return epath.Path(os.fspath(value))
    return epath.Path(os.path.expanduser(os.fspath(value)))


def _require_gcsfs() -> None:
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        raise ConfigError("gs:// paths need the gcs extra: pip install -e '.[gcs]' (gcsfs and google-auth)") from None
    # gcsfs logs a traceback when it gives up retrying; the error then reaches the user as one line from us.
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)


def check_access(value: PathLike, what: str, write: bool = False) -> None:
    """Before any work: a one-line `ConfigError` when a gs:// path cannot be used (no credentials, no bucket,
    no permission, no connection), naming the setting `what` it came from. Local paths pass through.

    Writing is checked by writing and deleting a small object, so a read-only grant shows up here and not
    at the first checkpoint.
    """
    if not is_remote(value):
        return
    target = path(value)
    bucket = os.fspath(value)[len("gs://") :].split("/", 1)[0]
    if "STORAGE_EMULATOR_HOST" not in os.environ:
        import google.auth
        import google.auth.exceptions

        try:
            google.auth.default()
        except google.auth.exceptions.DefaultCredentialsError as error:
            raise ConfigError(
                f"{what}={value}: no Google Cloud credentials ({_first_line(error)}); run `gcloud auth "
                "application-default login`, set GOOGLE_APPLICATION_CREDENTIALS, or use a VM's service account"
            ) from None
    try:  # object requests only: a grant on objects (roles/storage.objectUser) need not allow reading the bucket
        if write:
            probe = target / f".diffjax-write-check-{os.getpid()}"
            probe.write_bytes(b"")  # a missing bucket answers 404: FileNotFoundError
            probe.unlink()
        else:
            target.exists()  # lists the prefix; a missing path is for the caller to report
    except FileNotFoundError:
        raise ConfigError(
            f"{what}={value}: bucket gs://{bucket} does not exist (or these credentials cannot see it); create it "
            f"with `gcloud storage buckets create gs://{bucket}` or fix the path"
        ) from None
    except OSError as error:  # gcsfs raises OSError("Forbidden: ...") for 403, aiohttp's errors are OSErrors too
        if "Forbidden" in str(error) or isinstance(error, PermissionError):
            raise ConfigError(
                f"{what}={value}: no permission to {'write to' if write else 'read'} gs://{bucket} "
                f"({_first_line(error, last=True)}); grant this account roles/storage.objectUser on the bucket"
            ) from None
        raise ConfigError(
            f"{what}={value}: cannot reach Cloud Storage ({_first_line(error)}); check the network"
        ) from None


def _first_line(error: BaseException, last: bool = False) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return (lines[-1] if last else lines[0])[:200]


def absolute(value: epath.Path) -> epath.Path:
    """An absolute local path, or the URL unchanged (what gets stored in a config or printed)."""
    return value if is_remote(value) else value.absolute()


def write_atomically(target: PathLike, data: str | bytes) -> None:
    """Replace `target` with `data`: readers see the old file or the new one, never a part.

    Locally a temporary sibling is renamed over it (same directory, so the rename is atomic) and removed if
    anything fails; on an object store one upload replaces the object, which is atomic already.
    """
    target = path(target)
    if is_remote(target):
        target.write_bytes(data if isinstance(data, bytes) else data.encode())
        return
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        if isinstance(data, bytes):
            temporary.write_bytes(data)
        else:
            temporary.write_text(data)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def open_permissions(local: PathLike) -> None:
    """Give a local file the mode a new file gets from `open()`: 0666 less the umask (0644 under the usual
    022). Some libraries write through private temporaries, mode 0600."""
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    os.chmod(local, 0o666 & ~umask)


def remove_tree(target: PathLike) -> None:
    """Delete a directory (every object under a prefix); nothing happens when it is absent."""
    target = path(target)
    if target.exists():
        target.rmtree()


def move_tree(source: PathLike, target: PathLike) -> None:
    """Move a directory: a rename locally, a copy then delete of each object on an object store."""
    source, target = path(source), path(target)
    if is_remote(source):
        filesystem(source).mv(os.fspath(source), os.fspath(target), recursive=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(source, target)


def filesystem(url: PathLike):
    """gcsfs's filesystem object for a gs:// URL, for what epath does not offer (a recursive listing or glob,
    a directory move)."""
    import fsspec  # installed with gcsfs

    return fsspec.core.url_to_fs(os.fspath(url))[0]


def files_under(root: epath.Path) -> list[epath.Path]:
    """Every file below `root`, sorted (epath has no recursive glob on an object store: one listing there)."""
    if is_remote(root):
        return sorted(epath.Path(f"gs://{name}") for name in filesystem(root).find(os.fspath(root)))
    return sorted(top / name for top, _, names in root.walk() for name in names)


def upload_tree(local: PathLike, target: PathLike, last: str | None = None) -> None:
    """Copy a local directory's files under `target` (local or remote), the file named `last` after all others
    (readers take its presence as "complete")."""
    local, target = epath.Path(local), path(target)
    for file in sorted(files_under(local), key=lambda p: p.name == last):
        destination = target / os.fspath(file.relative_to(local))
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(file.read_bytes())


def download_tree(source: PathLike, local: PathLike) -> None:
    """Copy every file under `source` (local or remote) into the local directory `local`."""
    source, local = path(source), epath.Path(local)
    for file in files_under(source):
        destination = local / os.fspath(file.relative_to(source))
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(file.read_bytes())


@contextlib.contextmanager
def staged(target: PathLike, keep_existing: bool = False, last: str | None = None) -> Iterator[epath.Path]:
    """A local scratch directory that becomes `target` only when the block succeeds.

    With `keep_existing` the scratch starts as a copy of `target`. Locally the scratch is a sibling renamed
    into place (an earlier `target` is swapped out whole); on an object store it is uploaded file by file,
    `last` last, and objects of an earlier `target` that the scratch lacks are deleted afterwards.
    """
    target = path(target)
    if is_remote(target):
        with tempfile.TemporaryDirectory(prefix="diffjax-staged-") as scratch:
            scratch = epath.Path(scratch)
            if keep_existing and target.is_dir():
                download_tree(target, scratch)
            stale = set(files_under(target)) if target.exists() else set()  # before: the block may write there
            yield scratch
            upload_tree(scratch, target, last)
            fresh = {target / os.fspath(p.relative_to(scratch)) for p in files_under(scratch)}
            for obj in stale - fresh:
                obj.unlink()
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    old = target.with_name(f".{target.name}.{os.getpid()}.old")
    shutil.rmtree(scratch, ignore_errors=True)
    if keep_existing and target.is_dir():
        shutil.copytree(target, scratch)
    else:
        scratch.mkdir()
    try:
        yield scratch
        if target.exists():
            target.rename(old)
        scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)

"""Writing files for others to read: never half-written (a temporary sibling, then one rename), and with the
permissions a plain `open()` gives (some libraries write through private temporaries, mode 0600)."""

import os
from pathlib import Path


def write_atomically(path: Path, data: str | bytes) -> None:
    """Replace `path` with `data`: readers see the old file or the new one, never a part (same directory, so
    the rename is atomic). The temporary is removed if anything fails."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(data, bytes):
            temporary.write_bytes(data)
        else:
            temporary.write_text(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def open_permissions(path: Path) -> None:
    """Give `path` the mode a new file gets from `open()`: 0666 less the umask (0644 under the usual 022)."""
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    path.chmod(0o666 & ~umask)

"""Files written so that a reader never sees half of one: a temporary sibling, then one rename."""

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

"""diffjax: the Differential Transformer in JAX. `load_model` is the entry point for scripts and notebooks."""

from typing import Any

__all__ = ["load_model"]


def __getattr__(name: str) -> Any:
    """Import `load_model` on first use, so `import diffjax.config` stays light."""
    if name == "load_model":
        from diffjax.evaluate.load import load_model

        return load_model
    raise AttributeError(f"module 'diffjax' has no attribute {name!r}")

"""Attention cores as pure functions; every implementation shares the reference signatures."""

from diffjax.ops.reference import attention, diff_attention

__all__ = ["attention", "diff_attention"]

"""Benchmarks: `python -m diffjax.bench <name> --config=...`; figures go to docs/benchmarks.md."""

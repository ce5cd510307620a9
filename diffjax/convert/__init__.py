"""Weights to PyTorch layouts and back: Hugging Face DiffLlama/Llama, the official Microsoft layout (v1, V2).

`layout.py` is the one name/shape map both directions use; `hf.py` and `microsoft.py` add each format's
config; `runs.py` converts whole run directories; `python -m diffjax.convert` is the command line.
"""

"""Input data: the embedded corpus, tokenizers and batches."""

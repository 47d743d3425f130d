"""Data layer: corpus -> documents -> train/val split -> BPE tokenizer -> token cache -> batches."""

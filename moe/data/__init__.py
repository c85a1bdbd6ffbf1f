"""Data: text sources (TFDS), tokenizers, packing into rows, and the resumable grain pipeline."""

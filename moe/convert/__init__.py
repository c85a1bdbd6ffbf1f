"""Hugging Face conversion: per-architecture parameter layouts and the `python -m moe.convert` CLI."""

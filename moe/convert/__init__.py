"""Hugging Face conversion: parameter layouts per architecture, and the `python -m moe.convert`
command line."""

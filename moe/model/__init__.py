"""The decoder-only language model around the MoE layer: its config, attention and the
Transformer."""

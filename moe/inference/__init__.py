"""Inference: autocompletion with the KV cache, and the picture of which experts each token
chose."""

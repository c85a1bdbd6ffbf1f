"""moe: token-choice top-k Mixture-of-Experts layers and a training stack in JAX/Flax."""

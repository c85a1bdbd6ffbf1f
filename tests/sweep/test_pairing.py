"""What two members with the same seed share at initialisation (the pairing `moe/sweep/stats.py`
and every table.md's rule state): the non-MoE weights, bit for bit, whatever the MoE config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from configs import default
from moe.model.config import model_config_from
from moe.model.transformer import Transformer
from moe.sweep import spec

TINY = {"model.d_model": 32, "model.num_layers": 2, "model.num_heads": 2,
        "model.num_kv_heads": 2, "model.head_dim": 16, "model.d_ff": 64, "moe.expert_hidden": 32,
        "model.max_len": 16, "data.seq_len": 16, "moe.num_experts": 4}


def init_params(overrides: dict, seed: int) -> dict:
  """The params a run of this config and seed starts from: the trainer's derivation
  (moe/train/trainer.py: init key = split(PRNGKey(train.seed))[0], then params / jitter keys)."""
  c = default.get_config()
  for p, v in {**TINY, **overrides}.items():
    spec.apply_override(c, p, v, "test")
  model = Transformer(model_config_from(c, vocab_size=61))
  init_rng = jax.random.split(jax.random.PRNGKey(seed))[0]
  params_rng, jitter_rng = jax.random.split(init_rng)
  v = model.init({"params": params_rng, "jitter": jitter_rng, "dropout": jitter_rng},
                 jnp.zeros((1, 8), jnp.int32))
  return traverse_util.flatten_dict(nn.meta.unbox(v["params"]), sep="/")


def is_ffn(path: str) -> bool:
  return any(part in ("moe", "mlp") for part in path.split("/"))


@pytest.fixture(scope="module")
def base():
  return init_params({}, seed=0)


@pytest.mark.parametrize("overrides", [
    {"moe.num_selected": 2},
    {"moe.num_experts": 8},
    {"moe.expert_hidden": 64, "moe.num_selected": 2},
    {"moe.capacity_factor": None},
    {"moe.num_shared_experts": 1},
    {"moe.enabled": False},
    {"moe.enabled": False, "model.d_ff": 32},
])
def test_same_seed_same_non_moe_weights(base, overrides):
  other = init_params(overrides, seed=0)
  shared = sorted(k for k in base if not is_ffn(k))
  assert shared and shared == sorted(k for k in other if not is_ffn(k))
  for k in shared:
    np.testing.assert_array_equal(base[k], other[k], err_msg=k)


def test_settings_without_parameters_start_from_identical_weights(base):
  other = init_params({"moe.num_selected": 2, "moe.capacity_factor": 2.0,
                       "moe.z_loss_weight": 1e-2}, seed=0)
  assert sorted(other) == sorted(base)
  for k in base:
    np.testing.assert_array_equal(base[k], other[k], err_msg=k)


def test_another_seed_other_weights(base):
  other = init_params({}, seed=1)
  assert all(not np.array_equal(base[k], other[k]) for k in base if "norm" not in k)

"""moe.errors: the shared value checks (finite numbers, bounded integers, real bools), and
`once_per_config` (each config checked once)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import pytest

from conftest import one_line_error
from moe import errors
from moe.errors import ConfigError
from moe.layer import config as layer_config
from moe.model import config as model_config
from moe.model.transformer import Transformer


def test_value_checks_name_the_field_in_one_line():
  with one_line_error("train.steps", "integer >= 1"):
    errors.check_int("train.steps", 0, 1)
  with one_line_error("moe.capacity_factor", "> 0"):
    errors.check_positive("moe.capacity_factor", -1.0)
  with one_line_error("train.b1", "[0.0, 1.0)"):
    errors.check_number("train.b1", 1.0, 0.0, 1.0, high_open=True)
  with one_line_error("model.norm", "'rms'"):
    errors.check_choice("model.norm", "batch", ("rms", "layer"))
  errors.check_int("moe.group_size", None, 1, allow_none=True)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), True, "1.0", None])
def test_numbers_are_finite_and_not_bools(value):
  """nan and inf pass no interval, not even one up to math.inf; a bool is not a number."""
  with one_line_error("train.weight_decay", "finite", "[0.0, inf)"):
    errors.check_number("train.weight_decay", value, 0.0, math.inf)
  with one_line_error("model.logits_soft_cap", "finite number > 0"):
    errors.check_positive("model.logits_soft_cap", value)
  errors.check_number("train.weight_decay", 1e30, 0.0, math.inf)
  errors.check_positive("model.logits_soft_cap", 1e-30)


def test_ints_bools_and_strings():
  with one_line_error("train.steps", f"[1, {errors.INT32_MAX}]", "3000000000"):
    errors.check_int("train.steps", 3_000_000_000, 1, high=errors.INT32_MAX)
  errors.check_int("train.steps", errors.INT32_MAX, 1, high=errors.INT32_MAX)
  for bad in (1, 0, "True", None, 1.0):
    with one_line_error("model.remat", "True or False"):
      errors.check_bool("model.remat", bad)
  errors.check_bool("model.remat", False)
  for bad in (5, None, b"x"):
    with one_line_error("train.init_from", "string"):
      errors.check_str("train.init_from", bad)
  with one_line_error("data.name", "non-empty string"):
    errors.check_str("data.name", "", nonempty=True)
  errors.check_str("train.init_from", "")


def test_once_per_config_runs_a_passing_check_once_and_a_failing_one_every_time():
  calls = []

  @errors.once_per_config
  def check(x, *, strict=False):
    calls.append(x)
    if (x[0] if isinstance(x, list) else x) < 0:
      raise ConfigError(f"x must be >= 0, got {x}")

  check(1); check(1); check(1, strict=True); check(2)
  assert calls == [1, 1, 2]  # (1), (1, strict) and (2) are three configs
  for _ in range(2):
    with pytest.raises(ConfigError):
      check(-1)
  assert calls == [1, 1, 2, -1, -1]
  check([3]); check([3])  # unhashable: checked every time
  assert calls[-2:] == [[3], [3]]
  check(True); check(1.0)  # equal to the passed 1 (and hashed alike), but other configs
  assert calls[-2:] == [True, 1.0]


def test_the_model_guard_at_trace_time_finds_the_config_checked(monkeypatch):
  """validate_model's body runs once for one config: the entry point's check, then the
  Transformer's trace-time guard (init and apply) are cache hits."""
  bodies = []
  for module, name in ((model_config, "check_int"), (layer_config, "check_int")):
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, _real=real, **k: (bodies.append(a[0]),
                                                                   _real(*a, **k))[1])
  mc = model_config.ModelConfig(vocab_size=37, d_model=16, num_layers=2, num_heads=2,
                                num_kv_heads=2, head_dim=8, d_ff=32, max_len=16,
                                moe=layer_config.MoeConfig(num_experts=4, expert_hidden=16,
                                                           min_capacity=3))
  model_config.validate_model(mc)
  n = len(bodies)
  assert n > 0 and "model.vocab_size" in bodies and "moe.num_experts" in bodies
  tokens = jnp.zeros((2, 8), jnp.int32)
  variables = Transformer(mc).init(jax.random.PRNGKey(0), tokens)
  Transformer(mc).apply(variables, tokens)
  assert len(bodies) == n  # no check ran again
  bad = dataclasses.replace(mc, num_kv_heads=3)
  with one_line_error("model.num_kv_heads"):
    Transformer(bad).init(jax.random.PRNGKey(0), tokens)

"""The MoE layer's frozen config and its validation.

`configs/*.py` are `ml_collections` files; the layer never sees a ConfigDict: `moe_config_from`
turns the `moe` group into `MoeConfig`, and `validate_moe` checks every field a user can get
wrong, raising `ConfigError` with one line that names the field and the allowed values (numbers
finite, integers within int32, flags True or False).
"""

from __future__ import annotations

import dataclasses
import math

from moe.errors import (INT32_MAX, ConfigError, check_bool, check_choice, check_fields, check_int,
                        check_number, check_positive, once_per_config)

ROUTERS = ("token_choice", "expert_choice")
PRIORITIES = ("choice_major", "bpr")
EXPERT_MLPS = ("swiglu", "gelu")
DISPATCHES = ("auto", "reference", "einsum", "gather", "grouped", "ragged")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """One MoE layer. Letters as in docs/semantics.md: E experts, K chosen per token, F expert
  width."""

  num_experts: int = 8  # E
  num_selected: int = 2  # K
  expert_hidden: int = 256  # F, hidden width of one expert
  capacity_factor: float | None = 1.25  # training; None = dropless
  eval_capacity_factor: float | None = 2.0  # evaluation / decoding; None = dropless
  min_capacity: int = 4  # C >= this
  group_size: int | None = None  # tokens per routing group (T); None = the whole batch
  router: str = "token_choice"  # one of ROUTERS
  priority: str = "choice_major"  # one of PRIORITIES
  allow_noncausal_routing: bool = False  # permit BPR / expert choice in a causal decoder
  jitter_eps: float = 0.0  # multiplicative router-input jitter while training
  renormalize: bool = True  # divide the K combine weights by their sum
  num_shared_experts: int = 0  # always-on experts (DeepSeekMoE), each of width F
  expert_mlp: str = "swiglu"  # one of EXPERT_MLPS
  dispatch: str = "auto"  # one of DISPATCHES
  load_balance_weight: float = 1e-2  # L_bal weight
  z_loss_weight: float = 1e-3  # L_z weight
  bias_balancing: bool = False  # auxiliary-loss-free bias (selection only)
  bias_rate: float = 1e-3  # u in b_e += u * sign(mean_load - load_e)
  router_dtype: str = "float32"  # one of DTYPES; float32 by default (docs/semantics.md)

  def capacity_factor_for(self, train: bool) -> float | None:
    return self.capacity_factor if train else self.eval_capacity_factor


def moe_config_from(moe_cfg) -> MoeConfig:
  """`cfg.moe` (ConfigDict or dict) -> MoeConfig. Unknown keys are an error."""
  d = dict(moe_cfg)
  d.pop("enabled", None)
  check_fields("moe", d, MoeConfig)
  return MoeConfig(**d)


@once_per_config
def validate_moe(m: MoeConfig, *, causal: bool = True, prefix: str = "moe") -> None:
  """Every check on one MoE layer's settings (once per config). Raises ConfigError (one line)."""
  for f in ("num_experts", "num_selected", "expert_hidden"):
    check_int(f"{prefix}.{f}", getattr(m, f), 1, high=INT32_MAX)
  if m.num_selected > m.num_experts:
    raise ConfigError(f"{prefix}.num_selected (K={m.num_selected}) must be <= "
                      f"{prefix}.num_experts (E={m.num_experts})")
  check_positive(f"{prefix}.capacity_factor", m.capacity_factor, allow_none=True)
  check_positive(f"{prefix}.eval_capacity_factor", m.eval_capacity_factor, allow_none=True)
  check_int(f"{prefix}.min_capacity", m.min_capacity, 0, high=INT32_MAX)
  check_int(f"{prefix}.group_size", m.group_size, 1, high=INT32_MAX, allow_none=True)
  check_choice(f"{prefix}.router", m.router, ROUTERS)
  check_choice(f"{prefix}.priority", m.priority, PRIORITIES)
  check_choice(f"{prefix}.expert_mlp", m.expert_mlp, EXPERT_MLPS)
  check_choice(f"{prefix}.dispatch", m.dispatch, DISPATCHES)
  check_choice(f"{prefix}.router_dtype", m.router_dtype, DTYPES)
  check_number(f"{prefix}.jitter_eps", m.jitter_eps, 0.0, 1.0, high_open=True)
  check_int(f"{prefix}.num_shared_experts", m.num_shared_experts, 0, high=INT32_MAX)
  for f in ("load_balance_weight", "z_loss_weight", "bias_rate"):
    check_number(f"{prefix}.{f}", getattr(m, f), 0.0, math.inf)
  for f in ("allow_noncausal_routing", "renormalize", "bias_balancing"):
    check_bool(f"{prefix}.{f}", getattr(m, f))
  if causal and not m.allow_noncausal_routing:
    if m.router == "expert_choice":
      raise ConfigError(f"{prefix}.router='expert_choice' reads future tokens in a causal decoder; "
                        f"set {prefix}.allow_noncausal_routing=True to force it")
    if m.priority == "bpr":
      raise ConfigError(f"{prefix}.priority='bpr' reads future tokens in a causal decoder; "
                        f"set {prefix}.allow_noncausal_routing=True to force it")
  if m.router == "expert_choice" and m.capacity_factor is None:
    raise ConfigError(f"{prefix}.capacity_factor must be > 0 for router='expert_choice' "
                      f"(each expert takes C tokens), got None")

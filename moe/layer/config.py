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
DISPATCHES = ("auto", "reference", "einsum", "gather", "grouped", "ragged", "megablox")
DTYPES = ("float32", "bfloat16")
# "bfloat16": the router matmul only; "bfloat16_full": logits, scores, combine weights too.
ROUTER_DTYPES = DTYPES + ("bfloat16_full",)
SCORE_FUNCS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")
# How many experts a token takes (docs/semantics.md, "Adaptive k"): always K ("fixed"); by
# cumulative router probability up to a threshold ("top_p"); the same with the threshold steered
# toward a target mean k by a controller ("top_p_target").
K_RULES = ("fixed", "top_p", "top_p_target")


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
  router_dtype: str = "float32"  # one of ROUTER_DTYPES; float32 by default (docs/semantics.md)
  router_logit_scale: float = 1.0  # router logits x this (a stability stress knob)
  router_init_scale: float = 1.0  # router kernel init variance x this (Switch Table 3: 0.1)
  score_func: str = "softmax"  # one of SCORE_FUNCS; sigmoid = DeepSeek-V3 per-expert scores
  routed_scale: float = 1.0  # routed combine weights x this, after renormalising (DeepSeek)
  num_groups: int = 1  # contiguous expert groups for group-limited top-K (DeepSeek n_group)
  groups_selected: int = 1  # groups each token keeps (DeepSeek topk_group)
  group_score: str = "max"  # one of GROUP_SCORES: max (DeepSeek-V2) | top2_sum (DeepSeek-V3)
  shared_expert_hidden: int | None = None  # width of each shared expert; None = expert_hidden
  shared_expert_gate: bool = False  # shared output x sigmoid(x @ w[D, 1]) (Qwen2-MoE)
  k_rule: str = "fixed"  # one of K_RULES; adaptive rules take num_selected as k_max
  top_p: float = 0.5  # threshold p in (0, 1] ("top_p"); its start value ("top_p_target")
  k_min: int = 1  # adaptive rules: every token takes at least this many experts
  target_k: float | None = None  # "top_p_target": mean k the controller steers to
  top_p_rate: float = 1e-3  # "top_p_target": p += rate * sign(target_k - mean k) per step
  router_entropy_weight: float = 0.0  # weight of the router-entropy loss (Huang et al. 2024)

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
  check_choice(f"{prefix}.router_dtype", m.router_dtype, ROUTER_DTYPES)
  for f in ("router_logit_scale", "router_init_scale"):
    check_number(f"{prefix}.{f}", getattr(m, f), 0.0, math.inf, low_open=True)
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
  _validate_router_options(m, prefix)
  _validate_k_rule(m, prefix)
  if m.router == "expert_choice" and m.capacity_factor is None:
    raise ConfigError(f"{prefix}.capacity_factor must be > 0 for router='expert_choice' "
                      f"(each expert takes C tokens), got None")


def _validate_router_options(m: MoeConfig, prefix: str) -> None:
  """Score function, routed scale, expert groups and the shared experts' width and gate."""
  check_choice(f"{prefix}.score_func", m.score_func, SCORE_FUNCS)
  check_choice(f"{prefix}.group_score", m.group_score, GROUP_SCORES)
  check_number(f"{prefix}.routed_scale", m.routed_scale, 0.0, math.inf, low_open=True)
  check_int(f"{prefix}.num_groups", m.num_groups, 1, high=INT32_MAX)
  check_int(f"{prefix}.groups_selected", m.groups_selected, 1, high=INT32_MAX)
  check_int(f"{prefix}.shared_expert_hidden", m.shared_expert_hidden, 1, high=INT32_MAX,
            allow_none=True)
  check_bool(f"{prefix}.shared_expert_gate", m.shared_expert_gate)
  if m.num_experts % m.num_groups:
    raise ConfigError(f"{prefix}.num_groups ({m.num_groups}) must divide "
                      f"{prefix}.num_experts (E={m.num_experts})")
  per_group = m.num_experts // m.num_groups
  if m.groups_selected > m.num_groups:
    raise ConfigError(f"{prefix}.groups_selected ({m.groups_selected}) must be <= "
                      f"{prefix}.num_groups ({m.num_groups})")
  if m.num_groups > 1:
    if m.num_selected > m.groups_selected * per_group:
      raise ConfigError(f"{prefix}.num_selected (K={m.num_selected}) must be <= "
                        f"{prefix}.groups_selected * num_experts / num_groups "
                        f"(= {m.groups_selected * per_group})")
    if m.group_score == "top2_sum" and per_group < 2:
      raise ConfigError(f"{prefix}.group_score='top2_sum' needs >= 2 experts per group, "
                        f"got num_experts / num_groups = {per_group}")
  routed = (("score_func", m.score_func, "softmax"), ("routed_scale", m.routed_scale, 1.0),
            ("num_groups", m.num_groups, 1))
  for name, value, default in routed:
    if m.router == "expert_choice" and value != default:
      raise ConfigError(f"{prefix}.{name}={value!r} needs {prefix}.router='token_choice' "
                        f"(expert choice supports only {name}={default!r})")
  if m.shared_expert_gate and not m.num_shared_experts:
    raise ConfigError(f"{prefix}.shared_expert_gate=True needs {prefix}.num_shared_experts >= 1")


def _validate_k_rule(m: MoeConfig, prefix: str) -> None:
  """Adaptive k: the rule, threshold, k_min, target and controller step, entropy loss weight."""
  check_choice(f"{prefix}.k_rule", m.k_rule, K_RULES)
  check_number(f"{prefix}.top_p", m.top_p, 0.0, 1.0, low_open=True)
  check_int(f"{prefix}.k_min", m.k_min, 1, high=m.num_selected)
  check_number(f"{prefix}.top_p_rate", m.top_p_rate, 0.0, math.inf)
  check_number(f"{prefix}.router_entropy_weight", m.router_entropy_weight, 0.0, math.inf)
  if m.k_rule == "top_p_target" or m.target_k is not None:  # required there, else still sane
    check_number(f"{prefix}.target_k", m.target_k, m.k_min, m.num_selected)
  if m.k_rule != "fixed" and m.router == "expert_choice":
    raise ConfigError(f"{prefix}.k_rule={m.k_rule!r} needs {prefix}.router='token_choice' "
                      f"(in expert choice the experts pick the tokens; use k_rule='fixed')")


def planned_k(m: MoeConfig) -> float:
  """The experts per token a layer of this config is planned around: target_k under
  "top_p_target" (the controller holds the mean k there), else num_selected (fixed k; and the
  upper bound k_max under "top_p", whose mean k is not known in advance). It is the K of the
  capacity C = capacity_factor * K * T / E (so the factor keeps its meaning of slack over the
  mean load; under "top_p" the buffers of a fixed-K layer, so an expert overflows only where
  that layer's would) and of the model FLOPs (`moe.model.flops`)."""
  return float(m.target_k) if m.k_rule == "top_p_target" else m.num_selected

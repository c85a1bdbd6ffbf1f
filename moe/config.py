"""Frozen dataclasses that configure the modules, and their validation.

`configs/*.py` are `ml_collections` files (grouped `model`, `moe`, `train`, `data`, `mesh`).
Modules never see a ConfigDict: `model_config_from(cfg)` turns the `model` and `moe` groups into
the frozen dataclasses below, and `validate(cfg)` checks every field a user can get wrong,
raising `ConfigError` with one line that names the field and the allowed values, before anything
is compiled.
"""

from __future__ import annotations

import dataclasses


class ConfigError(ValueError):
  """A user mistake in a config: one line naming the field and what is allowed."""


ROUTERS = ("token_choice", "expert_choice")
PRIORITIES = ("choice_major", "bpr")
EXPERT_MLPS = ("swiglu", "gelu")
DISPATCHES = ("auto", "reference", "einsum", "gather", "grouped", "ragged")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """One MoE layer. Letters as in the spec: E experts, K chosen per token, F expert width."""

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
  router_dtype: str = "float32"  # one of DTYPES; the spec's default is float32

  def capacity_factor_for(self, train: bool) -> float | None:
    return self.capacity_factor if train else self.eval_capacity_factor


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only Transformer LM; `moe=None` makes it dense."""

  vocab_size: int = 259
  d_model: int = 128  # D
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 4  # < num_heads: grouped-query attention
  head_dim: int = 32
  d_ff: int = 512  # dense FFN width (dense blocks, and the dense baseline)
  max_len: int = 256  # longest sequence the model accepts
  moe: MoeConfig | None = None
  moe_interval: int = 1  # an MoE block every n-th block
  first_moe_layer: int = 0  # index of the first MoE block
  dtype: str = "float32"  # compute dtype; params and router stay float32
  scan_layers: bool = False  # nn.scan over identical blocks
  remat: bool = False  # rematerialize each block in the backward pass
  # Architecture options used by converted checkpoints (GPT-2, Mixtral).
  norm: str = "rms"  # "rms" | "layer" (LayerNorm with bias)
  norm_eps: float = 1e-6
  positions: str = "rope"  # "rope" | "learned"
  rope_theta: float = 10000.0
  mlp_activation: str = "swiglu"  # dense FFN: "swiglu" | "gelu"
  attention_bias: bool = False  # biases on q/k/v/o and dense MLP projections
  tie_embeddings: bool = False
  sliding_window: int | None = None  # attend to at most this many previous tokens
  logits_soft_cap: float | None = None

  def is_moe_layer(self, i: int) -> bool:
    return (self.moe is not None and i >= self.first_moe_layer
            and (i - self.first_moe_layer) % self.moe_interval == 0)


def _fields(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)}


def moe_config_from(moe_cfg) -> MoeConfig:
  """`cfg.moe` (ConfigDict or dict) -> MoeConfig. Unknown keys are an error."""
  d = dict(moe_cfg)
  d.pop("enabled", None)
  unknown = set(d) - _fields(MoeConfig)
  if unknown:
    raise ConfigError(f"moe: unknown field(s) {sorted(unknown)}; allowed: {sorted(_fields(MoeConfig))}")
  return MoeConfig(**d)


def model_config_from(cfg, vocab_size: int | None = None) -> ModelConfig:
  """The `model` and `moe` groups of a config -> ModelConfig (moe=None when cfg.moe.enabled is off)."""
  d = dict(cfg.model)
  unknown = set(d) - _fields(ModelConfig)
  if unknown:
    raise ConfigError(f"model: unknown field(s) {sorted(unknown)}; allowed: {sorted(_fields(ModelConfig))}")
  if vocab_size is not None and d.get("vocab_size", -1) in (-1, 0, None):
    d["vocab_size"] = vocab_size
  moe = moe_config_from(cfg.moe) if cfg.moe.get("enabled", True) else None
  return ModelConfig(moe=moe, **d)


def check_choice(name: str, value, allowed) -> None:
  """ConfigError (one line) unless `value` is one of `allowed`."""
  if value not in allowed:
    raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _positive(name: str, value, allow_none: bool = False) -> None:
  if value is None and allow_none:
    return
  if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
    extra = " or None" if allow_none else ""
    raise ConfigError(f"{name} must be > 0{extra}, got {value!r}")


def validate_moe(m: MoeConfig, *, causal: bool = True, prefix: str = "moe") -> None:
  """Every check on one MoE layer's settings. Raises ConfigError (one line)."""
  for f in ("num_experts", "num_selected", "expert_hidden"):
    v = getattr(m, f)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise ConfigError(f"{prefix}.{f} must be an integer >= 1, got {v!r}")
  if m.num_selected > m.num_experts:
    raise ConfigError(f"{prefix}.num_selected (K={m.num_selected}) must be <= "
                      f"{prefix}.num_experts (E={m.num_experts})")
  _positive(f"{prefix}.capacity_factor", m.capacity_factor, allow_none=True)
  _positive(f"{prefix}.eval_capacity_factor", m.eval_capacity_factor, allow_none=True)
  if m.min_capacity < 0:
    raise ConfigError(f"{prefix}.min_capacity must be >= 0, got {m.min_capacity}")
  if m.group_size is not None:
    _positive(f"{prefix}.group_size", m.group_size)
  check_choice(f"{prefix}.router", m.router, ROUTERS)
  check_choice(f"{prefix}.priority", m.priority, PRIORITIES)
  check_choice(f"{prefix}.expert_mlp", m.expert_mlp, EXPERT_MLPS)
  check_choice(f"{prefix}.dispatch", m.dispatch, DISPATCHES)
  check_choice(f"{prefix}.router_dtype", m.router_dtype, DTYPES)
  if not 0.0 <= m.jitter_eps < 1.0:
    raise ConfigError(f"{prefix}.jitter_eps must be in [0, 1), got {m.jitter_eps}")
  if m.num_shared_experts < 0:
    raise ConfigError(f"{prefix}.num_shared_experts must be >= 0, got {m.num_shared_experts}")
  for f in ("load_balance_weight", "z_loss_weight", "bias_rate"):
    if getattr(m, f) < 0:
      raise ConfigError(f"{prefix}.{f} must be >= 0, got {getattr(m, f)}")
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


def validate_model(mc: ModelConfig) -> None:
  for f in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "d_ff", "max_len", "moe_interval"):
    v = getattr(mc, f)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise ConfigError(f"model.{f} must be an integer >= 1, got {v!r}")
  if mc.num_heads % mc.num_kv_heads:
    raise ConfigError(f"model.num_kv_heads ({mc.num_kv_heads}) must divide model.num_heads "
                      f"({mc.num_heads})")
  if mc.first_moe_layer < 0:
    raise ConfigError(f"model.first_moe_layer must be >= 0, got {mc.first_moe_layer}")
  check_choice("model.dtype", mc.dtype, DTYPES)
  check_choice("model.norm", mc.norm, ("rms", "layer"))
  check_choice("model.positions", mc.positions, ("rope", "learned"))
  check_choice("model.mlp_activation", mc.mlp_activation, EXPERT_MLPS)
  if mc.positions == "rope" and mc.head_dim % 2:
    raise ConfigError(f"model.head_dim must be even with rotary positions, got {mc.head_dim}")
  if mc.sliding_window is not None:
    _positive("model.sliding_window", mc.sliding_window)
  if mc.moe is not None:
    validate_moe(mc.moe, causal=True)

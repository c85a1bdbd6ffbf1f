"""The language model's frozen config, its construction from a config file, and its validation.

`model_config_from(cfg)` turns the `model` and `moe` groups of an `ml_collections` config into
`ModelConfig` (with a `MoeConfig` inside, or None for a dense model); `validate_model` checks every
model field a user can get wrong, raising `ConfigError` with one line; `validate_model_groups(cfg)`
runs it on a config's groups before the tokenizer (and so the vocabulary size) is known, and
`check_vocab_size(cfg, n)` once it is: an explicit `model.vocab_size` below the tokenizer's `n`
ids would index past the embedding table.
"""

from __future__ import annotations

import dataclasses
import math

from moe.errors import (INT32_MAX, ConfigError, check_bool, check_choice, check_fields, check_int,
                        check_number, check_positive, once_per_config)
from moe.layer.config import DTYPES, EXPERT_MLPS, MoeConfig, moe_config_from, validate_moe


QK_NORMS = (None, "head", "full")  # model.qk_norm: see ModelConfig


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
  # Architecture options used by converted checkpoints (GPT-2, Mixtral, Llama, Qwen, OLMoE).
  norm: str = "rms"  # "rms" | "layer" (LayerNorm with bias)
  norm_eps: float = 1e-6
  positions: str = "rope"  # "rope" | "learned"
  rope_theta: float = 10000.0
  # Scaled rotary frequencies (Hugging Face's rope_parameters; moe/model/attention.py):
  # "default" | "llama3" (Llama 3.1+) | "yarn" (DeepSeek-V2/V3, long-context Qwen).
  rope_type: str = "default"
  rope_factor: float = 1.0  # llama3 / yarn: context extension factor (>= 1)
  rope_original_max_len: int | None = None  # llama3 / yarn: pretraining length; None = max_len
  rope_low_freq_factor: float = 1.0  # llama3: wavelengths past original/this are divided by factor
  rope_high_freq_factor: float = 4.0  # llama3: wavelengths under original/this are kept
  rope_beta_fast: float = 32.0  # yarn: rotations where the ramp to interpolation starts
  rope_beta_slow: float = 1.0  # yarn: rotations where it ends
  rope_truncate: bool = True  # yarn: round the ramp's ends to whole features
  rope_attention_factor: float | None = None  # yarn: cos/sin scale; None = from the mscales
  rope_mscale: float | None = None  # yarn: with rope_mscale_all_dim, the cos/sin scale's numerator
  rope_mscale_all_dim: float | None = None  # yarn: its denominator; MLA's softmax scale too
  mlp_activation: str = "swiglu"  # dense FFN: "swiglu" | "gelu"
  attention_bias: bool = False  # biases on q/k/v/o and dense MLP projections
  qkv_bias: bool = False  # biases on q/k/v only (Qwen2); attention_bias adds them anyway
  # RMSNorm on queries and keys after projection, before rotary: None | "head" (width Dh, one
  # scale shared by every head, Qwen3) | "full" (over all H*Dh of q and N*Dh of k, OLMoE).
  qk_norm: str | None = None
  tie_embeddings: bool = False
  sliding_window: int | None = None  # attend to at most this many previous tokens
  logits_soft_cap: float | None = None
  # Multi-head latent attention (DeepSeek-V2/V3, moe/model/mla.py); "mha" ignores these fields
  # and "mla" ignores num_kv_heads and head_dim.
  attention: str = "mha"  # "mha" (attention.py) | "mla" (mla.py)
  q_lora_rank: int | None = None  # low-rank queries; None = one q projection
  kv_lora_rank: int = 64  # width of the cached key/value latent
  qk_nope_head_dim: int = 32  # per-head query/key features without rotary positions
  qk_rope_head_dim: int = 16  # rotary query/key features (the key's are shared by all heads)
  v_head_dim: int = 32  # per-head value width
  rope_interleave: bool = False  # rotary pairs (x0, x1), (x2, x3), ... (DeepSeek checkpoints)

  def is_moe_layer(self, i: int) -> bool:
    return (self.moe is not None and i >= self.first_moe_layer
            and (i - self.first_moe_layer) % self.moe_interval == 0)


def model_config_from(cfg, vocab_size: int | None = None) -> ModelConfig:
  """The `model` and `moe` groups of a config -> ModelConfig (moe=None when cfg.moe.enabled is off)."""
  d = dict(cfg.model)
  check_fields("model", d, ModelConfig)
  if vocab_size is not None and _from_tokenizer(d.get("vocab_size", -1)):
    d["vocab_size"] = vocab_size
  enabled = cfg.moe.get("enabled", True)
  check_bool("moe.enabled", enabled)
  moe = moe_config_from(cfg.moe) if enabled else None
  return ModelConfig(moe=moe, **d)


# `model.vocab_size=-1` takes the tokenizer's size, which is only known once the data is built.
# validate_model asks nothing of it but a positive integer, which every tokenizer's size is, so
# the config is checked with this stand-in, before any data is prepared, and not again after.
VOCAB_STAND_IN = 259


def _from_tokenizer(vocab_size) -> bool:
  """model.vocab_size -1 (or 0, None): the tokenizer's size."""
  return vocab_size is None or (type(vocab_size) is int and vocab_size in (-1, 0))


def check_vocab_size(cfg, tokenizer_vocab_size: int) -> None:
  """An explicit `model.vocab_size` must hold every id of the tokenizer (called once the tokenizer
  exists, before anything is compiled). Raises ConfigError (one line)."""
  v = cfg.model.get("vocab_size", -1)
  if not _from_tokenizer(v) and v < tokenizer_vocab_size:
    raise ConfigError(f"model.vocab_size={v} is smaller than the tokenizer's "
                      f"{tokenizer_vocab_size} ids (data.tokenizer={cfg.data.tokenizer!r}); use "
                      "-1 to take the tokenizer's size")


def validate_model_groups(cfg) -> None:
  """validate_model on the `model` and `moe` groups (unknown fields included), vocabulary left to
  the tokenizer or not. Raises ConfigError (one line)."""
  validate_model(model_config_from(cfg, vocab_size=VOCAB_STAND_IN))


@once_per_config
def validate_model(mc: ModelConfig) -> None:
  """Every check on the model's settings and its MoE layer's, once per config (the trainer's
  phase 1 checks it; the Transformer's trace-time guard then finds it done). Raises ConfigError
  (one line)."""
  for f in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "d_ff", "max_len", "moe_interval"):
    check_int(f"model.{f}", getattr(mc, f), 1, high=INT32_MAX)
  if mc.attention != "mla" and mc.num_heads % mc.num_kv_heads:
    raise ConfigError(f"model.num_kv_heads ({mc.num_kv_heads}) must divide model.num_heads "
                      f"({mc.num_heads})")
  check_int("model.first_moe_layer", mc.first_moe_layer, 0, high=INT32_MAX)
  if mc.moe is not None and mc.first_moe_layer >= mc.num_layers:
    raise ConfigError(f"model.first_moe_layer ({mc.first_moe_layer}) must be < model.num_layers "
                      f"({mc.num_layers}) with moe.enabled=True, or the model has no MoE block")
  for f in ("scan_layers", "remat", "attention_bias", "qkv_bias", "tie_embeddings"):
    check_bool(f"model.{f}", getattr(mc, f))
  check_number("model.norm_eps", mc.norm_eps, 0.0, math.inf, low_open=True)
  check_number("model.rope_theta", mc.rope_theta, 0.0, math.inf, low_open=True)
  _validate_rope(mc)
  check_positive("model.logits_soft_cap", mc.logits_soft_cap, allow_none=True)
  check_choice("model.dtype", mc.dtype, DTYPES)
  check_choice("model.norm", mc.norm, ("rms", "layer"))
  check_choice("model.positions", mc.positions, ("rope", "learned"))
  check_choice("model.qk_norm", mc.qk_norm, QK_NORMS)
  check_choice("model.mlp_activation", mc.mlp_activation, EXPERT_MLPS)
  if mc.positions == "rope" and mc.head_dim % 2:
    raise ConfigError(f"model.head_dim must be even with rotary positions, got {mc.head_dim}")
  check_int("model.sliding_window", mc.sliding_window, 1, high=INT32_MAX, allow_none=True)
  if mc.scan_layers and mc.moe is not None and (mc.moe_interval != 1 or mc.first_moe_layer != 0):
    raise ConfigError(
        "model.scan_layers=True needs identical blocks: use moe_interval=1 and first_moe_layer=0 "
        f"(got moe_interval={mc.moe_interval}, first_moe_layer={mc.first_moe_layer}) "
        "or scan_layers=False")
  _validate_mla(mc)
  if mc.moe is not None:
    validate_moe(mc.moe, causal=True)


# The scaled-rotary fields each rope_type reads, and their defaults (a field another type reads
# must keep its default, so that no setting is silently ignored).
ROPE_TYPE_FIELDS = {"default": (), "llama3": ("rope_factor", "rope_original_max_len",
                                              "rope_low_freq_factor", "rope_high_freq_factor"),
                    "yarn": ("rope_factor", "rope_original_max_len", "rope_beta_fast",
                             "rope_beta_slow", "rope_truncate", "rope_attention_factor",
                             "rope_mscale", "rope_mscale_all_dim")}


def _validate_rope(mc: ModelConfig) -> None:
  """The scaled-rotary fields: each in its range, and only those `model.rope_type` reads set."""
  check_choice("model.rope_type", mc.rope_type, tuple(ROPE_TYPE_FIELDS))
  check_number("model.rope_factor", mc.rope_factor, 1.0, math.inf)
  check_int("model.rope_original_max_len", mc.rope_original_max_len, 1, high=INT32_MAX,
            allow_none=True)
  for f in ("rope_low_freq_factor", "rope_high_freq_factor", "rope_beta_fast", "rope_beta_slow"):
    check_positive(f"model.{f}", getattr(mc, f))
  for f in ("rope_attention_factor", "rope_mscale", "rope_mscale_all_dim"):
    check_positive(f"model.{f}", getattr(mc, f), allow_none=True)
  check_bool("model.rope_truncate", mc.rope_truncate)
  if mc.rope_high_freq_factor <= mc.rope_low_freq_factor:
    raise ConfigError(f"model.rope_high_freq_factor ({mc.rope_high_freq_factor}) must be > "
                      f"model.rope_low_freq_factor ({mc.rope_low_freq_factor})")
  if mc.rope_beta_fast < mc.rope_beta_slow:
    raise ConfigError(f"model.rope_beta_fast ({mc.rope_beta_fast}) must be >= "
                      f"model.rope_beta_slow ({mc.rope_beta_slow})")
  if mc.rope_type != "default" and mc.positions != "rope":
    raise ConfigError(f"model.rope_type={mc.rope_type!r} needs model.positions='rope', got "
                      f"{mc.positions!r}")
  used = ROPE_TYPE_FIELDS[mc.rope_type]
  for f in sorted({f for fs in ROPE_TYPE_FIELDS.values() for f in fs} - set(used)):
    default = ModelConfig.__dataclass_fields__[f].default
    if getattr(mc, f) != default:
      readers = [t for t, fs in ROPE_TYPE_FIELDS.items() if f in fs]
      raise ConfigError(f"model.{f}={getattr(mc, f)!r} applies to model.rope_type "
                        f"{' / '.join(map(repr, readers))} only (got {mc.rope_type!r}); leave it "
                        f"at {default!r}")


def _validate_mla(mc: ModelConfig) -> None:
  """The MLA fields (checked whatever the attention, like every field), and what MLA needs."""
  check_choice("model.attention", mc.attention, ("mha", "mla"))
  check_int("model.q_lora_rank", mc.q_lora_rank, 1, high=INT32_MAX, allow_none=True)
  for f in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
    check_int(f"model.{f}", getattr(mc, f), 1, high=INT32_MAX)
  check_bool("model.rope_interleave", mc.rope_interleave)
  if mc.qk_rope_head_dim % 2:
    raise ConfigError(f"model.qk_rope_head_dim must be even, got {mc.qk_rope_head_dim}")
  if mc.attention != "mla":
    return
  for f, off in (("qk_norm", None), ("qkv_bias", False)):
    if getattr(mc, f) != off:
      raise ConfigError(f"model.{f}={getattr(mc, f)!r} applies to model.attention='mha' only "
                        f"(MLA normalises its latents instead); set it to {off!r}")
  if mc.positions != "rope":
    raise ConfigError(f"model.attention='mla' needs model.positions='rope' (its rotary key is "
                      f"decoupled), got {mc.positions!r}")

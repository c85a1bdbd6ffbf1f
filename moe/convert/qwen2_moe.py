"""Qwen2-MoE (`qwen2_moe`, Qwen2MoeForCausalLM): import and export. Names: see `moe.convert.layouts`.

Qwen2-MoE routes softmax top-K (renormalised when `norm_topk_prob`), adds one shared expert of
width `shared_expert_intermediate_size` whose output is multiplied per token by
sigmoid(x @ shared_expert_gate), has biases on q/k/v (`qkv_bias`, no o bias) and dense blocks
where `mlp_only_layers` / `decoder_sparse_step` say so. Here: `moe.renormalize`, one shared expert
(`moe.num_shared_experts=1`, `moe.shared_expert_hidden`, `moe.shared_expert_gate=True`, gate at
`moe/shared/gate` [D, 1]), `model.qkv_bias`, and `model.first_moe_layer` / `model.moe_interval`
when the MoE blocks are every n-th block from one block on (anything else is refused, naming the
field).

Export also takes models trained here with shared experts (`layouts.export_type`): S shared
experts of width F_s are one Qwen2-MoE shared expert of width S*F_s (their hidden units
concatenated, as `moe.layer.modules.SharedExperts` stores them). Without a gate here, the
Hugging Face gate weight is written as 0 and the shared down projection doubled:
sigmoid(0) * (2 W) x = 0.5 * 2 * (W x), exact in floating point (scaling by 2 only moves the
exponent). Dense blocks become `mlp_only_layers` with `decoder_sparse_step=1` (or a plain
`decoder_sparse_step` when the MoE blocks are layers step-1, 2*step-1, ...).

Arrays keep their stored dtype (only transposes, reshapes and stacks here). The embedding, norms,
attention, dense MLPs, experts and shared expert map as `moe.convert.decoder` says (gate_proj,
silu side -> w_gate, up_proj -> w_in, down_proj -> w_out).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from moe.convert import decoder
from moe.convert.rope import ROPE_FIELDS, rope_config
from moe.convert.tensors import Tensors, need as _need
from moe.errors import ConfigError
from moe.layer.config import MoeConfig
from moe.model.config import ModelConfig


def _moe_in(t: Tensors, m: str, D: int, E: int, F: int, Fs: int) -> dict:
  out = decoder.import_moe(t, m, D, E, F)
  shared = decoder.import_swiglu(t, m + "shared_expert.", D, Fs)
  gate = t.get(m + "shared_expert_gate.weight", (1, D)).T
  if Fs:  # a zero-width shared expert adds nothing, gate or not
    out["shared"] = {**shared, "gate": gate}
  return out


def qwen2_moe_to_params(hf: dict, t: Tensors):
  where = t.where
  if hf.get("hidden_act", "silu") != "silu":
    raise ConfigError(f"{where}: hidden_act={hf.get('hidden_act')!r} is not supported (SwiGLU "
                      "with silu only)")
  if hf.get("use_sliding_window"):
    raise ConfigError(f"{where}: use_sliding_window=True is not supported (Qwen2-MoE's "
                      "per-layer sliding window)")
  model = decoder.shape_fields(hf, where, theta=1e6)
  D, L, Fd = model["d_model"], model["num_layers"], model["d_ff"]
  sparse = decoder.sparse_blocks(hf, L) if int(hf.get("num_experts", 0) or 0) > 0 else []
  if sparse:
    E, K = _need(hf, "num_experts", where), _need(hf, "num_experts_per_tok", where)
    F = _need(hf, "moe_intermediate_size", where)
    Fs = int(hf.get("shared_expert_intermediate_size", 0) or 0)
    first, interval = decoder.moe_placement(hf, sparse, L, where)
  else:
    first, interval = 0, 1
  model.update(qkv_bias=bool(hf.get("qkv_bias", True)), moe_interval=interval,
               first_moe_layer=first)
  params = decoder.import_top(t, model, saved_tied_head=False)
  for i in range(L):
    blk = decoder.import_attention(t, i, model)
    if i in sparse:
      blk["moe"] = _moe_in(t, f"model.layers.{i}.mlp.", D, E, F, Fs)
    else:
      blk["mlp"] = decoder.import_swiglu(t, f"model.layers.{i}.mlp.", D, Fd)
    params[f"block_{i}"] = blk
  if not sparse:
    return model, None, params
  moe = dict(enabled=True, num_experts=E, num_selected=K, expert_hidden=F, capacity_factor=None,
             eval_capacity_factor=None, renormalize=bool(hf.get("norm_topk_prob", False)),
             router="token_choice", expert_mlp="swiglu", num_shared_experts=1 if Fs else 0,
             shared_expert_hidden=Fs or None, shared_expert_gate=bool(Fs), jitter_eps=0.0,
             load_balance_weight=float(hf.get("router_aux_loss_coef", 1e-3)),
             z_loss_weight=0.0, bias_balancing=False, router_dtype="float32")
  return model, moe, params


# ----------------------------------------------------------------------------------------------
# Export

# Fields the export maps (or that only affect training); any other field must keep its default.
_MODEL_MAPPED = {"vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "d_ff", "max_len", "moe", "moe_interval", "first_moe_layer", "dtype",
                 "scan_layers", "remat", "norm_eps", "rope_theta", "qkv_bias", "tie_embeddings",
                 *ROPE_FIELDS}
_MOE_MAPPED = {"num_experts", "num_selected", "expert_hidden", "capacity_factor",
               "eval_capacity_factor", "min_capacity", "group_size", "priority",
               "allow_noncausal_routing", "jitter_eps", "renormalize", "num_shared_experts",
               "dispatch", "load_balance_weight", "z_loss_weight", "bias_rate", "router_dtype",
               "shared_expert_hidden", "shared_expert_gate", "groups_selected", "group_score",
               "router_init_scale"}  # router_logit_scale: folded into the kernels by moe.convert.cli


def export_refusal(model: dict, moe: dict | None) -> str | None:
  """Why these `model` / `moe` groups cannot be exported as Qwen2-MoE (None: they can)."""
  if moe is None or not moe.get("enabled", True):
    return "the model is dense; Qwen2-MoE export needs MoE blocks"
  for cls, group, have, mapped in ((ModelConfig, "model", model, _MODEL_MAPPED),
                                   (MoeConfig, "moe", moe, _MOE_MAPPED)):
    for f in dataclasses.fields(cls):
      default = getattr(cls(), f.name)
      if f.name not in mapped and have.get(f.name, default) != default:
        return (f"{group}.{f.name}={have[f.name]!r} has no Qwen2-MoE equivalent "
                f"(needs {default!r})")
  return None


def _moe_out(out: dict, m: str, moe_p: dict, moe: dict) -> None:
  ex = moe_p["experts"]
  out.update(decoder.export_moe(moe_p, m))
  if "shared" not in moe_p:  # no shared experts: a zero-width one adds exactly nothing
    d, dtype = ex["w_in"].shape[1], ex["w_in"].dtype
    for name, shape in (("gate_proj", (0, d)), ("up_proj", (0, d)), ("down_proj", (d, 0))):
      out[f"{m}shared_expert.{name}.weight"] = np.zeros(shape, dtype)
    out[m + "shared_expert_gate.weight"] = np.zeros((1, d), dtype)
    return
  sh = moe_p["shared"]
  out.update(decoder.export_swiglu(sh, m + "shared_expert."))
  if moe.get("shared_expert_gate"):
    out[m + "shared_expert_gate.weight"] = sh["gate"].T
  else:  # no gate here: sigmoid(0) = 0.5 times a doubled down projection (exact)
    out[m + "shared_expert.down_proj.weight"] = (sh["w_out"] + sh["w_out"]).T
    out[m + "shared_expert_gate.weight"] = np.zeros((1, sh["w_in"].shape[0]), sh["w_in"].dtype)


def params_to_qwen2_moe(model: dict, moe: dict | None, block, top: dict):
  """Our params -> (HF config.json dict, {name: array}). `block(i)` gives block i's params
  (unscanned), `top` the non-block params. Raises ConfigError for what Qwen2-MoE lacks."""
  why = export_refusal(model, moe)
  if why:
    raise ConfigError(f"--to_hf (Qwen2-MoE): {why}")
  D, L, H, N, Dh = (model[k] for k in ("d_model", "num_layers", "num_heads", "num_kv_heads",
                                       "head_dim"))
  first, interval = model.get("first_moe_layer", 0), model.get("moe_interval", 1)
  sparse = list(range(first, L, interval))
  out = decoder.export_top(model, top)
  for i in range(L):
    p, m = block(i), f"model.layers.{i}.mlp."
    out.update(decoder.export_attention(p, i, model))
    if i in sparse:
      _moe_out(out, m, p["moe"], moe)
    else:
      out.update(decoder.export_swiglu(p["mlp"], m))
  plain_step = first == interval - 1  # MoE at layers step-1, 2*step-1, ...: no list needed
  shared_width = moe["num_shared_experts"] * (moe.get("shared_expert_hidden")
                                              or moe["expert_hidden"])
  config = {
      "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
      "vocab_size": model["vocab_size"], "hidden_size": D, "intermediate_size": model["d_ff"],
      "moe_intermediate_size": moe["expert_hidden"],
      "shared_expert_intermediate_size": shared_width, "num_hidden_layers": L,
      "num_attention_heads": H, "num_key_value_heads": N, "head_dim": Dh, "hidden_act": "silu",
      "max_position_embeddings": model["max_len"], "rms_norm_eps": model["norm_eps"],
      **rope_config(model),
      "use_sliding_window": False, "decoder_sparse_step": interval if plain_step else 1,
      "mlp_only_layers": [] if plain_step else [i for i in range(L) if i not in sparse],
      "num_experts": moe["num_experts"], "num_experts_per_tok": moe["num_selected"],
      "norm_topk_prob": bool(moe.get("renormalize", True)),
      "qkv_bias": bool(model.get("qkv_bias", False)),
      "tie_word_embeddings": bool(model["tie_embeddings"]),
      "router_aux_loss_coef": float(moe.get("load_balance_weight", 1e-3)),
      "output_router_logits": False, "attention_dropout": 0.0, "initializer_range": 0.02,
      "use_cache": True, "dtype": str(next(iter(out.values())).dtype),
  }
  return config, out

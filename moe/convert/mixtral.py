"""Mixtral (`mixtral`, MixtralForCausalLM): import and export. Names: see `moe.convert.layouts`.

The embedding, norms, attention and experts map as `moe.convert.decoder` says; the experts
(block_sparse_moe.experts.<e>) name their projections w1 = gate (silu side) -> w_gate,
w3 = up -> w_in, w2 = down -> w_out (`decoder.MIXTRAL_EXPERT`).
"""

from __future__ import annotations

from moe.convert import decoder
from moe.convert.rope import rope_config
from moe.convert.tensors import Tensors, need as _need
from moe.errors import ConfigError


def mixtral_to_params(hf: dict, t: Tensors):
  where = t.where
  if hf.get("hidden_act", "silu") != "silu":
    raise ConfigError(f"{where}: Mixtral hidden_act={hf.get('hidden_act')!r} is not supported "
                      "(experts are SwiGLU with silu)")
  model = decoder.shape_fields(hf, where, eps=1e-5, theta=1e6)
  model.update(sliding_window=hf.get("sliding_window"), moe_interval=1, first_moe_layer=0)
  D, L, F = model["d_model"], model["num_layers"], model["d_ff"]
  E, K = _need(hf, "num_local_experts", where), _need(hf, "num_experts_per_tok", where)
  # A tied head saved anyway is refused as an unused tensor (Mixtral's import never took one).
  params = decoder.import_top(t, model, saved_tied_head=False)
  for i in range(L):
    blk = decoder.import_attention(t, i, model)
    blk["moe"] = decoder.import_moe(t, f"model.layers.{i}.block_sparse_moe.", D, E, F,
                                    decoder.MIXTRAL_EXPERT)
    params[f"block_{i}"] = blk
  moe = dict(enabled=True, num_experts=E, num_selected=K, expert_hidden=F, capacity_factor=None,
             eval_capacity_factor=None, renormalize=True, router="token_choice",
             expert_mlp="swiglu", num_shared_experts=0, jitter_eps=float(
                 hf.get("router_jitter_noise", 0.0) or 0.0),
             load_balance_weight=float(hf.get("router_aux_loss_coef", 1e-2)), z_loss_weight=0.0,
             bias_balancing=False, router_dtype="float32")
  return model, moe, params


def params_to_mixtral(model: dict, moe: dict | None, block, top: dict):
  """Our params -> (HF config.json dict, {name: array in the checkpoint's dtype, maybe a view}).
  `block(i)` gives block i's params (unscanned), `top` the non-block params. Raises ConfigError
  for what Mixtral lacks."""
  where = "--to_hf (Mixtral)"
  if moe is None or not moe.get("enabled", True):
    raise ConfigError(f"{where}: the model is dense; Mixtral has MoE blocks only")
  checks = [("model.norm", model["norm"], "rms"), ("model.positions", model["positions"], "rope"),
            ("model.attention_bias", model["attention_bias"], False),
            ("model.qkv_bias", model.get("qkv_bias", False), False),
            ("model.qk_norm", model.get("qk_norm"), None),
            ("model.moe_interval", model.get("moe_interval", 1), 1),
            ("model.first_moe_layer", model.get("first_moe_layer", 0), 0),
            ("model.logits_soft_cap", model.get("logits_soft_cap"), None),
            ("moe.expert_mlp", moe.get("expert_mlp", "swiglu"), "swiglu"),
            ("moe.router", moe.get("router", "token_choice"), "token_choice"),
            ("moe.renormalize", moe.get("renormalize", True), True),
            ("moe.num_shared_experts", moe.get("num_shared_experts", 0), 0),
            ("moe.bias_balancing", moe.get("bias_balancing", False), False)]
  decoder.refuse_unless(where, "Mixtral", [(name, have, (want,)) for name, have, want in checks])
  D, L, H, N, Dh = (model[k] for k in ("d_model", "num_layers", "num_heads", "num_kv_heads",
                                       "head_dim"))
  E, K, F, V = moe["num_experts"], moe["num_selected"], moe["expert_hidden"], model["vocab_size"]
  out = decoder.export_top(model, top)
  for i in range(L):
    p = block(i)
    out.update(decoder.export_attention(p, i, model))
    out.update(decoder.export_moe(p["moe"], f"model.layers.{i}.block_sparse_moe.",
                                  decoder.MIXTRAL_EXPERT))
  config = {
      "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": V,
      "hidden_size": D, "intermediate_size": F, "num_hidden_layers": L,
      "num_attention_heads": H, "num_key_value_heads": N, "head_dim": Dh, "hidden_act": "silu",
      "max_position_embeddings": model["max_len"], "rms_norm_eps": model["norm_eps"],
      **rope_config(model),
      "sliding_window": model.get("sliding_window"), "num_local_experts": E,
      "num_experts_per_tok": K, "tie_word_embeddings": bool(model["tie_embeddings"]),
      "router_aux_loss_coef": float(moe.get("load_balance_weight", 1e-2)),
      "router_jitter_noise": 0.0, "output_router_logits": False, "attention_dropout": 0.0,
      "initializer_range": 0.02, "use_cache": True, "dtype": "float32",
  }
  return config, out

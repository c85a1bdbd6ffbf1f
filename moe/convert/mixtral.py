"""Mixtral (`mixtral`, MixtralForCausalLM): import and export. Names: see `moe.convert.layouts`.

PyTorch `nn.Linear` weights are [out, in] (transposed here). Experts: w1 = gate (silu side) ->
w_gate, w3 = up -> w_in, w2 = down -> w_out.
"""

from __future__ import annotations

import numpy as np

from moe.convert.rope import rope_config, rope_fields
from moe.convert.tensors import Tensors, need as _need
from moe.errors import ConfigError


def mixtral_to_params(hf: dict, t: Tensors):
  where = t.where
  if hf.get("hidden_act", "silu") != "silu":
    raise ConfigError(f"{where}: Mixtral hidden_act={hf.get('hidden_act')!r} is not supported "
                      "(experts are SwiGLU with silu)")
  D, L = _need(hf, "hidden_size", where), _need(hf, "num_hidden_layers", where)
  H = _need(hf, "num_attention_heads", where)
  N = hf.get("num_key_value_heads") or H
  Dh = hf.get("head_dim") or D // H
  V, F = _need(hf, "vocab_size", where), _need(hf, "intermediate_size", where)
  E, K = _need(hf, "num_local_experts", where), _need(hf, "num_experts_per_tok", where)
  tied = bool(hf.get("tie_word_embeddings", False))
  g = t.get
  params = {"embedding_table": g("model.embed_tokens.weight", (V, D)),
            "final_norm": {"scale": g("model.norm.weight", (D,))}}
  if not tied:
    params["output_kernel"] = g("lm_head.weight", (V, D)).T
  for i in range(L):
    b = f"model.layers.{i}."
    a = b + "self_attn."
    m = b + "block_sparse_moe."
    params[f"block_{i}"] = {
        "attn_norm": {"scale": g(b + "input_layernorm.weight", (D,))},
        "attn": {"q_kernel": g(a + "q_proj.weight", (H * Dh, D)).T.reshape(D, H, Dh),
                 "k_kernel": g(a + "k_proj.weight", (N * Dh, D)).T.reshape(D, N, Dh),
                 "v_kernel": g(a + "v_proj.weight", (N * Dh, D)).T.reshape(D, N, Dh),
                 "o_kernel": g(a + "o_proj.weight", (D, H * Dh)).T.reshape(H, Dh, D)},
        "mlp_norm": {"scale": g(b + "post_attention_layernorm.weight", (D,))},
        "moe": {"router": {"kernel": g(m + "gate.weight", (E, D)).T},
                "experts": {
                    "w_gate": np.stack([g(f"{m}experts.{e}.w1.weight", (F, D)).T for e in range(E)]),
                    "w_in": np.stack([g(f"{m}experts.{e}.w3.weight", (F, D)).T for e in range(E)]),
                    "w_out": np.stack([g(f"{m}experts.{e}.w2.weight", (D, F)).T for e in range(E)]),
                }}}
  model = dict(vocab_size=V, d_model=D, num_layers=L, num_heads=H, num_kv_heads=N, head_dim=Dh,
               d_ff=F, max_len=int(hf.get("max_position_embeddings", 4096)), norm="rms",
               norm_eps=float(hf.get("rms_norm_eps", 1e-5)), positions="rope",
               **rope_fields(hf, where, 1e6), mlp_activation="swiglu", attention_bias=False,
               tie_embeddings=tied, sliding_window=hf.get("sliding_window"),
               moe_interval=1, first_moe_layer=0)
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
  for name, have, want in checks:
    if have != want:
      raise ConfigError(f"{where}: {name}={have!r} has no Mixtral equivalent (needs {want!r})")
  D, L, H, N, Dh = (model[k] for k in ("d_model", "num_layers", "num_heads", "num_kv_heads",
                                       "head_dim"))
  E, K, F, V = moe["num_experts"], moe["num_selected"], moe["expert_hidden"], model["vocab_size"]
  out = {"model.embed_tokens.weight": top["embedding_table"],
         "model.norm.weight": top["final_norm"]["scale"]}
  if not model["tie_embeddings"]:
    out["lm_head.weight"] = top["output_kernel"].T
  for i in range(L):
    p = block(i)
    b = f"model.layers.{i}."
    a = p["attn"]
    out[b + "input_layernorm.weight"] = p["attn_norm"]["scale"]
    out[b + "post_attention_layernorm.weight"] = p["mlp_norm"]["scale"]
    out[b + "self_attn.q_proj.weight"] = a["q_kernel"].reshape(D, H * Dh).T
    out[b + "self_attn.k_proj.weight"] = a["k_kernel"].reshape(D, N * Dh).T
    out[b + "self_attn.v_proj.weight"] = a["v_kernel"].reshape(D, N * Dh).T
    out[b + "self_attn.o_proj.weight"] = a["o_kernel"].reshape(H * Dh, D).T
    m = b + "block_sparse_moe."
    out[m + "gate.weight"] = p["moe"]["router"]["kernel"].T
    ex = p["moe"]["experts"]
    for e in range(E):
      out[f"{m}experts.{e}.w1.weight"] = ex["w_gate"][e].T
      out[f"{m}experts.{e}.w3.weight"] = ex["w_in"][e].T
      out[f"{m}experts.{e}.w2.weight"] = ex["w_out"][e].T
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

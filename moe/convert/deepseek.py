"""DeepSeek-V3 (`deepseek_v3`) and DeepSeek-V2 (`deepseek_v2`): import and export. Names: see
`moe.convert.layouts`; the attention is MLA (`model.attention="mla"`, moe/model/mla.py).

Mapping (PyTorch `nn.Linear` weights are [out, in], transposed here; the embedding, norms, dense
MLPs and experts through `moe.convert.decoder`):

  self_attn.q_proj [H*(Dn+Dr), D]            -> attn/q_kernel [D, H, Dn+Dr]   (q_lora_rank None)
  self_attn.q_a_proj [Rq, D], q_a_layernorm  -> attn/q_a_kernel [D, Rq], q_a_norm_scale
  self_attn.q_b_proj [H*(Dn+Dr), Rq]         -> attn/q_b_kernel [Rq, H, Dn+Dr]
  self_attn.kv_a_proj_with_mqa [R+Dr, D]     -> attn/kv_a_kernel [D, R] | attn/k_rope_kernel [D, Dr]
  self_attn.kv_a_layernorm [R]               -> attn/kv_a_norm_scale
  self_attn.kv_b_proj [H*(Dn+Dv), R]         -> attn/k_b_kernel [R, H, Dn] | attn/v_b_kernel [R, H, Dv]
  self_attn.o_proj [D, H*Dv]                 -> attn/o_kernel [H, Dv, D]
  mlp.{gate,up,down}_proj (first_k_dense_replace blocks) -> mlp/{w_gate, w_in, w_out}
  mlp.gate.weight [E, D]                     -> moe/router/kernel [D, E]
  mlp.gate.e_score_correction_bias [E] (V3)  -> the `moe_bias` collection: block_i/moe/bias
  mlp.experts.{e}.{gate,up,down}_proj        -> moe/experts/{w_gate, w_in, w_out}[e]
      (or the fused mlp.experts.gate_up_proj [E, 2F, D] / down_proj [E, D, F])
  mlp.shared_experts.{gate,up,down}_proj     -> moe/shared/{w_gate, w_in, w_out}, width S*F

Routing. V3: sigmoid scores, selection on scores + correction bias (`score_func="sigmoid"`,
`bias_balancing=True`, so the bias lives in `moe_bias`), groups scored by their top-2 sum
(`num_groups=n_group`, `groups_selected=topk_group`, `group_score="top2_sum"`),
`renormalize=norm_topk_prob`, `routed_scale=routed_scaling_factor`. V2: softmax scores,
`topk_method` greedy (one group) or group_limited_greedy (groups scored by their max); V2 never
renormalizes (transformers ignores its norm_topk_prob). Both route dropless. DeepSeek's
multi-token-prediction layers (index >= num_hidden_layers) are not part of the causal LM and
are skipped. V2's complex rotary embedding rotates adjacent pairs: `rope_interleave=True`.
"""

from __future__ import annotations

import numpy as np

from moe.convert import decoder
from moe.convert.rope import rope_config, rope_fields
from moe.convert.tensors import Tensors, need as _need
from moe.errors import ConfigError

def _experts(t: Tensors, m: str, E: int, D: int, F: int) -> dict:
  if f"{m}experts.gate_up_proj" in t:  # transformers' fused in-memory layout
    gate_up = t.get(f"{m}experts.gate_up_proj", (E, 2 * F, D))
    return {"w_gate": gate_up[:, :F].transpose(0, 2, 1), "w_in": gate_up[:, F:].transpose(0, 2, 1),
            "w_out": t.get(f"{m}experts.down_proj", (E, D, F)).transpose(0, 2, 1)}
  return decoder.import_experts(t, m, D, E, F)


def _attn(t: Tensors, a: str, m: dict) -> dict:
  D, H, R, Rq = m["d_model"], m["num_heads"], m["kv_lora_rank"], m["q_lora_rank"]
  Dn, Dr, Dv = m["qk_nope_head_dim"], m["qk_rope_head_dim"], m["v_head_dim"]
  Dq = Dn + Dr
  p = {}
  if Rq is None:
    p["q_kernel"] = t.get(a + "q_proj.weight", (H * Dq, D)).T.reshape(D, H, Dq)
  else:
    p["q_a_kernel"] = t.get(a + "q_a_proj.weight", (Rq, D)).T
    p["q_a_norm_scale"] = t.get(a + "q_a_layernorm.weight", (Rq,))
    p["q_b_kernel"] = t.get(a + "q_b_proj.weight", (H * Dq, Rq)).T.reshape(Rq, H, Dq)
  kv_a = t.get(a + "kv_a_proj_with_mqa.weight", (R + Dr, D)).T
  p["kv_a_kernel"], p["k_rope_kernel"] = kv_a[:, :R], kv_a[:, R:]
  p["kv_a_norm_scale"] = t.get(a + "kv_a_layernorm.weight", (R,))
  kv_b = t.get(a + "kv_b_proj.weight", (H * (Dn + Dv), R)).T.reshape(R, H, Dn + Dv)
  p["k_b_kernel"], p["v_b_kernel"] = kv_b[:, :, :Dn], kv_b[:, :, Dn:]
  p["o_kernel"] = t.get(a + "o_proj.weight", (D, H * Dv)).T.reshape(H, Dv, D)
  return p


def _common(hf: dict, where: str) -> dict:
  """The model group shared by V2 and V3 (refusing what this project does not compute)."""
  if hf.get("hidden_act", "silu") != "silu":
    raise ConfigError(f"{where}: hidden_act={hf.get('hidden_act')!r} is not supported (SwiGLU "
                      "with silu only)")
  quant = hf.get("quantization_config")
  if quant:
    method = quant.get("quant_method") if isinstance(quant, dict) else quant
    raise ConfigError(f"{where}: quantization_config (quant_method={method!r}) is not "
                      "supported: convert a bfloat16 / float32 checkpoint")
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag):
      raise ConfigError(f"{where}: {flag}=True is not supported")
  D, L, H = (_need(hf, k, where) for k in ("hidden_size", "num_hidden_layers",
                                             "num_attention_heads"))
  return dict(
      vocab_size=_need(hf, "vocab_size", where), d_model=D, num_layers=L, num_heads=H,
      num_kv_heads=H, head_dim=_need(hf, "qk_rope_head_dim", where),
      d_ff=_need(hf, "intermediate_size", where),
      max_len=int(hf.get("max_position_embeddings", 4096)), norm="rms",
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)), positions="rope",
      **rope_fields(hf, where), mlp_activation="swiglu", attention_bias=False,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), sliding_window=None,
      attention="mla", q_lora_rank=hf.get("q_lora_rank"),
      kv_lora_rank=_need(hf, "kv_lora_rank", where),
      qk_nope_head_dim=_need(hf, "qk_nope_head_dim", where),
      qk_rope_head_dim=_need(hf, "qk_rope_head_dim", where),
      v_head_dim=_need(hf, "v_head_dim", where),
      moe_interval=1, first_moe_layer=int(hf.get("first_k_dense_replace") or 0))


def _routing(hf: dict, where: str, version: int) -> dict:
  """The MoE routing fields of V3 (sigmoid) or V2 (softmax)."""
  E, K = _need(hf, "n_routed_experts", where), _need(hf, "num_experts_per_tok", where)
  r = dict(num_experts=E, num_selected=K, routed_scale=float(hf.get("routed_scaling_factor", 1.0)))
  if version == 3:
    r.update(score_func="sigmoid", bias_balancing=True, renormalize=bool(hf.get("norm_topk_prob")),
             num_groups=int(hf.get("n_group") or 1), groups_selected=int(hf.get("topk_group") or 1),
             group_score="top2_sum")
    return r
  method = hf.get("topk_method", "greedy")
  r.update(score_func="softmax", bias_balancing=False, renormalize=False)
  if method == "group_limited_greedy":
    r.update(num_groups=_need(hf, "n_group", where), groups_selected=_need(hf, "topk_group", where),
             group_score="max")
  elif method != "greedy":
    raise ConfigError(f"{where}: topk_method={method!r} is not supported (greedy, "
                      "group_limited_greedy)")
  return r


def _to_params(hf: dict, t: Tensors, version: int):
  where = t.where
  model = _common(hf, where)
  model["rope_interleave"] = bool(hf.get("rope_interleave", True)) if version == 3 else True
  D, L, Fd = (model[k] for k in ("d_model", "num_layers", "d_ff"))
  first_moe = model["first_moe_layer"]
  moe = None
  if first_moe < L:
    F, S = _need(hf, "moe_intermediate_size", where), int(hf.get("n_shared_experts") or 0)
    moe = dict(enabled=True, expert_hidden=F, capacity_factor=None, eval_capacity_factor=None,
               router="token_choice", expert_mlp="swiglu", num_shared_experts=S, jitter_eps=0.0,
               load_balance_weight=0.0, z_loss_weight=0.0, router_dtype="float32",
               **_routing(hf, where, version))
  params = decoder.import_top(t, model, saved_tied_head=False)
  moe_bias = {}
  for i in range(L):
    m = f"model.layers.{i}.mlp."
    block = decoder.import_block(t, i, D, _attn(t, f"model.layers.{i}.self_attn.", model))
    if i < first_moe:
      block["mlp"] = decoder.import_swiglu(t, m, D, Fd)
    else:
      E, F, S = moe["num_experts"], moe["expert_hidden"], moe["num_shared_experts"]
      block["moe"] = {"router": {"kernel": t.get(m + "gate.weight", (E, D)).T},
                      "experts": _experts(t, m, E, D, F)}
      if S:
        block["moe"]["shared"] = decoder.import_swiglu(t, m + "shared_experts.", D, S * F)
      if version == 3:
        moe_bias[f"block_{i}"] = {"moe": {"bias": t.get(m + "gate.e_score_correction_bias",
                                                        (E,))}}
    params[f"block_{i}"] = block
  # Multi-token-prediction layers (DeepSeek-V3's layer 61) and rotary buffers: not the LM.
  for name in t.unused():
    parts = name.split(".")
    mtp = name.startswith("model.layers.") and int(parts[2]) >= L
    empty = "shared_experts." in name and moe is not None and not moe["num_shared_experts"]
    if mtp or empty or "rotary_emb" in name:  # (empty: n_shared_experts=0 leaves [0, D] weights)
      t.used.add(name)
  return model, moe, params, moe_bias


def deepseek_v3_to_params(hf: dict, t: Tensors):
  return _to_params(hf, t, 3)


def deepseek_v2_to_params(hf: dict, t: Tensors):
  return _to_params(hf, t, 2)


# ----------------------------------------------------------------------------- export


def _export_checks(model: dict, moe: dict, version: int) -> None:
  where = f"--to_hf (DeepSeek-V{version})"
  if moe is None or not moe.get("enabled", True):
    raise ConfigError(f"{where}: the model is dense; export supports MoE models only")
  g = moe.get
  checks = [("model.attention", model.get("attention", "mha"), "mla"),
            ("model.norm", model["norm"], "rms"), ("model.positions", model["positions"], "rope"),
            ("model.attention_bias", model["attention_bias"], False),
            ("model.qkv_bias", model.get("qkv_bias", False), False),
            ("model.qk_norm", model.get("qk_norm"), None),
            ("model.mlp_activation", model["mlp_activation"], "swiglu"),
            ("model.moe_interval", model.get("moe_interval", 1), 1),
            ("model.sliding_window", model.get("sliding_window"), None),
            ("model.logits_soft_cap", model.get("logits_soft_cap"), None),
            ("moe.expert_mlp", g("expert_mlp", "swiglu"), "swiglu"),
            ("moe.router", g("router", "token_choice"), "token_choice"),
            ("moe.shared_expert_gate", g("shared_expert_gate", False), False)]
  if version == 3:
    checks.append(("moe.score_func", g("score_func", "softmax"), "sigmoid"))
    if g("num_groups", 1) > 1:
      checks.append(("moe.group_score", g("group_score", "max"), "top2_sum"))
  else:
    checks += [("moe.score_func", g("score_func", "softmax"), "softmax"),
               ("moe.bias_balancing", g("bias_balancing", False), False),
               ("moe.renormalize", g("renormalize", True), False),
               ("model.rope_interleave", model.get("rope_interleave", False), True)]
    if g("num_groups", 1) > 1:
      checks.append(("moe.group_score", g("group_score", "max"), "max"))
  decoder.refuse_unless(where, f"DeepSeek-V{version}",
                        [(name, have, (want,)) for name, have, want in checks])
  S, F = g("num_shared_experts", 0), moe["expert_hidden"]
  width = S * (g("shared_expert_hidden") or F)
  if width % F:
    raise ConfigError(f"{where}: moe.num_shared_experts * moe.shared_expert_hidden ({width}) must "
                      f"be a multiple of moe.expert_hidden ({F}) (n_shared_experts x "
                      "moe_intermediate_size)")


def _export_attn(a: dict, model: dict) -> dict:
  D, H, R = model["d_model"], model["num_heads"], model["kv_lora_rank"]
  Dq, Dv = model["qk_nope_head_dim"] + model["qk_rope_head_dim"], model["v_head_dim"]
  out = {}
  if model.get("q_lora_rank") is None:
    out["q_proj.weight"] = a["q_kernel"].reshape(D, H * Dq).T
  else:
    out["q_a_proj.weight"] = a["q_a_kernel"].T
    out["q_a_layernorm.weight"] = a["q_a_norm_scale"]
    out["q_b_proj.weight"] = a["q_b_kernel"].reshape(model["q_lora_rank"], H * Dq).T
  out["kv_a_proj_with_mqa.weight"] = np.concatenate([a["kv_a_kernel"], a["k_rope_kernel"]],
                                                    axis=1).T
  out["kv_a_layernorm.weight"] = a["kv_a_norm_scale"]
  out["kv_b_proj.weight"] = np.concatenate([a["k_b_kernel"], a["v_b_kernel"]],
                                           axis=2).reshape(R, -1).T
  out["o_proj.weight"] = a["o_kernel"].reshape(H * Dv, D).T
  return out


def _params_to_deepseek(model: dict, moe: dict | None, block, top: dict, version: int):
  _export_checks(model, moe, version)
  L, first = model["num_layers"], model.get("first_moe_layer", 0)
  E, F = moe["num_experts"], moe["expert_hidden"]
  out = decoder.export_top(model, top)
  for i in range(L):
    p = block(i)
    b = f"model.layers.{i}."
    out.update(decoder.export_norms(p, i))
    for name, x in _export_attn(p["attn"], model).items():
      out[b + "self_attn." + name] = x
    m = b + "mlp."
    if i < first:
      out.update(decoder.export_swiglu(p["mlp"], m))
      continue
    out[m + "gate.weight"] = p["moe"]["router"]["kernel"].T
    if version == 3:
      bias = p.get("moe_bias", {}).get("moe", {}).get("bias")
      out[m + "gate.e_score_correction_bias"] = (np.zeros((E,), np.float32) if bias is None
                                                 else bias)
    out.update(decoder.export_experts(p["moe"]["experts"], m))
    if moe.get("num_shared_experts", 0):
      out.update(decoder.export_swiglu(p["moe"]["shared"], m + "shared_experts."))
  S = moe.get("num_shared_experts", 0) * (moe.get("shared_expert_hidden") or F) // F
  config = {
      "architectures": [f"DeepseekV{version}ForCausalLM"], "model_type": f"deepseek_v{version}",
      "vocab_size": model["vocab_size"], "hidden_size": model["d_model"],
      "intermediate_size": model["d_ff"], "moe_intermediate_size": F,
      "num_hidden_layers": L, "num_attention_heads": model["num_heads"],
      "num_key_value_heads": model["num_heads"], "n_shared_experts": S, "n_routed_experts": E,
      "num_experts_per_tok": moe["num_selected"],
      "routed_scaling_factor": float(moe.get("routed_scale", 1.0)),
      "kv_lora_rank": model["kv_lora_rank"], "q_lora_rank": model.get("q_lora_rank"),
      "qk_nope_head_dim": model["qk_nope_head_dim"], "qk_rope_head_dim": model["qk_rope_head_dim"],
      "v_head_dim": model["v_head_dim"], "first_k_dense_replace": first,
      "norm_topk_prob": bool(moe.get("renormalize", True)), "hidden_act": "silu",
      "max_position_embeddings": model["max_len"], "rms_norm_eps": model["norm_eps"],
      **rope_config(model),
      "tie_word_embeddings": bool(model["tie_embeddings"]), "attention_bias": False,
      "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "dtype": "float32",
  }
  groups, chosen = moe.get("num_groups", 1), moe.get("groups_selected", 1)
  if version == 3:
    config.update(n_group=groups, topk_group=chosen, rope_interleave=bool(model["rope_interleave"]),
                  num_nextn_predict_layers=0)
  else:
    config.update(mlp_bias=False, topk_method="greedy" if groups == 1 else "group_limited_greedy",
                  n_group=groups if groups > 1 else None, topk_group=chosen if groups > 1 else None)
  return config, out


def params_to_deepseek_v3(model: dict, moe: dict | None, block, top: dict):
  """Our params -> (HF config.json dict, {name: array}); `block(i)` also carries block i's
  `moe_bias` subtree (the correction bias) when the model has one."""
  return _params_to_deepseek(model, moe, block, top, 3)


def params_to_deepseek_v2(model: dict, moe: dict | None, block, top: dict):
  return _params_to_deepseek(model, moe, block, top, 2)

"""Llama-layout decoders: dense `llama`, `qwen2`, `qwen3` (import and export), and the attention,
norm and SwiGLU pieces the MoE families of this layout (`moe.convert.olmoe`) share.

Names: see `moe.convert.layouts`. PyTorch `nn.Linear` weights are [out, in] (transposed here).
Per block: input_layernorm -> attn_norm, post_attention_layernorm -> mlp_norm;
self_attn.{q,k,v,o}_proj (+ .bias) -> attn/{q,k,v,o}_kernel (+ _bias);
self_attn.{q,k}_norm -> attn/{q,k}_norm/scale (QK-norm, `model.qk_norm`);
mlp.gate_proj -> w_gate (silu side), mlp.up_proj -> w_in, mlp.down_proj -> w_out (+ b_*).

The families differ in their biases and QK-norm:
  llama: attention_bias (q/k/v/o) together with mlp_bias -> model.attention_bias (which biases
         both; one without the other is refused);
  qwen2: q/k/v biases always -> model.qkv_bias;
  qwen3: QK-norm per head -> model.qk_norm="head" (attention_bias=True is refused).
Arrays keep their stored dtype (only transposes and reshapes here).
"""

from __future__ import annotations

import numpy as np

from moe.convert.rope import rope_config, rope_fields
from moe.convert.tensors import Tensors, need
from moe.errors import ConfigError

DENSE_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM"}


# ----------------------------------------------------------------------------- config fields


def sliding_window(hf: dict, where: str) -> int | None:
  """Qwen2/Qwen3's window: applied on the layers `layer_types` marks "sliding_attention" (by
  default those >= max_window_layers when use_sliding_window). All or none of the layers, or a
  one-line refusal: this project has one window for every layer."""
  window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
  if window is None:  # transformers then attends fully on "sliding_attention" layers too
    return None
  n = need(hf, "num_hidden_layers", where)
  kinds = hf.get("layer_types") or [
      "sliding_attention" if i >= hf.get("max_window_layers", 0) else "full_attention"
      for i in range(n)]
  if set(kinds) - {"sliding_attention", "full_attention"}:
    raise ConfigError(f"{where}: layer_types {sorted(set(kinds))} are not supported "
                      "(full_attention / sliding_attention only)")
  if "sliding_attention" not in kinds:
    return None
  if "full_attention" in kinds:
    raise ConfigError(f"{where}: use_sliding_window with max_window_layers="
                      f"{hf.get('max_window_layers')} (a window on some layers only) is not "
                      "supported: this project applies one sliding window to every layer")
  return int(window)


def check_silu(hf: dict, where: str, family: str) -> None:
  if hf.get("hidden_act", "silu") != "silu":
    raise ConfigError(f"{where}: {family} hidden_act={hf.get('hidden_act')!r} is not supported "
                      "(SwiGLU with silu only)")


def shape_fields(hf: dict, where: str) -> dict:
  """The `model` fields every family of this layout shares (no biases, no QK-norm)."""
  D, L = need(hf, "hidden_size", where), need(hf, "num_hidden_layers", where)
  H = need(hf, "num_attention_heads", where)
  return dict(vocab_size=need(hf, "vocab_size", where), d_model=D, num_layers=L, num_heads=H,
              num_kv_heads=hf.get("num_key_value_heads") or H,
              head_dim=hf.get("head_dim") or D // H,
              d_ff=need(hf, "intermediate_size", where),
              max_len=int(hf.get("max_position_embeddings", 4096)), norm="rms",
              norm_eps=float(hf.get("rms_norm_eps", 1e-6)), positions="rope",
              **rope_fields(hf, where), mlp_activation="swiglu",
              tie_embeddings=bool(hf.get("tie_word_embeddings", False)), logits_soft_cap=None,
              attention_bias=False, qkv_bias=False, qk_norm=None, sliding_window=None)


def shape_config(model: dict) -> dict:
  """The Hugging Face config.json entries `shape_fields` reads back."""
  return {"vocab_size": model["vocab_size"], "hidden_size": model["d_model"],
          "intermediate_size": model["d_ff"], "num_hidden_layers": model["num_layers"],
          "num_attention_heads": model["num_heads"], "num_key_value_heads": model["num_kv_heads"],
          "head_dim": model["head_dim"], "hidden_act": "silu",
          "max_position_embeddings": model["max_len"], "rms_norm_eps": model["norm_eps"],
          **rope_config(model), "tie_word_embeddings": bool(model["tie_embeddings"]),
          "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
          "dtype": "float32"}


def refuse_unless(where: str, target: str, checks) -> None:
  """checks: (setting name, value, allowed values); the first value not allowed is a one-line
  ConfigError naming the setting."""
  for name, have, allowed in checks:
    if have not in allowed:
      raise ConfigError(f"{where}: {name}={have!r} has no {target} equivalent (needs "
                        + " or ".join(repr(a) for a in allowed) + ")")


def common_checks(model: dict) -> list:
  """What every export of this layout needs of the `model` group."""
  return [("model.norm", model.get("norm", "rms"), ("rms",)),
          ("model.positions", model.get("positions", "rope"), ("rope",)),
          ("model.mlp_activation", model.get("mlp_activation", "swiglu"), ("swiglu",)),
          ("model.logits_soft_cap", model.get("logits_soft_cap"), (None,))]


# ----------------------------------------------------------------------------- tensors


def import_top(t: Tensors, model: dict) -> dict:
  V, D = model["vocab_size"], model["d_model"]
  params = {"embedding_table": t.get("model.embed_tokens.weight", (V, D)),
            "final_norm": {"scale": t.get("model.norm.weight", (D,))}}
  if not model["tie_embeddings"]:
    params["output_kernel"] = t.get("lm_head.weight", (V, D)).T
  elif "lm_head.weight" in t:  # a tied head saved anyway: the same matrix
    if not np.array_equal(t.get("lm_head.weight", (V, D)), params["embedding_table"]):
      raise ConfigError(f"{t.where}: tie_word_embeddings=True but lm_head.weight differs from "
                        "model.embed_tokens.weight")
  return params


def export_top(model: dict, top: dict) -> dict:
  out = {"model.embed_tokens.weight": top["embedding_table"],
         "model.norm.weight": top["final_norm"]["scale"]}
  if not model["tie_embeddings"]:
    out["lm_head.weight"] = top["output_kernel"].T
  return out


def import_attention(t: Tensors, i: int, model: dict) -> dict:
  """Block i's attn_norm, attn and mlp_norm params (biases and QK-norm as `model` says)."""
  D, H, N, Dh = (model[k] for k in ("d_model", "num_heads", "num_kv_heads", "head_dim"))
  b = f"model.layers.{i}."
  a = b + "self_attn."
  heads = {"q": H, "k": N, "v": N}
  attn = {f"{n}_kernel": t.get(f"{a}{n}_proj.weight", (h * Dh, D)).T.reshape(D, h, Dh)
          for n, h in heads.items()}
  attn["o_kernel"] = t.get(a + "o_proj.weight", (D, H * Dh)).T.reshape(H, Dh, D)
  if model["attention_bias"] or model["qkv_bias"]:
    for n, h in heads.items():
      attn[f"{n}_bias"] = t.get(f"{a}{n}_proj.bias", (h * Dh,)).reshape(h, Dh)
  if model["attention_bias"]:
    attn["o_bias"] = t.get(a + "o_proj.bias", (D,))
  if model["qk_norm"] == "head":
    for n in "qk":
      attn[f"{n}_norm"] = {"scale": t.get(f"{a}{n}_norm.weight", (Dh,))}
  elif model["qk_norm"] == "full":
    for n in "qk":
      attn[f"{n}_norm"] = {"scale": t.get(f"{a}{n}_norm.weight",
                                          (heads[n] * Dh,)).reshape(heads[n], Dh)}
  return {"attn_norm": {"scale": t.get(b + "input_layernorm.weight", (D,))}, "attn": attn,
          "mlp_norm": {"scale": t.get(b + "post_attention_layernorm.weight", (D,))}}


def export_attention(p: dict, i: int, model: dict) -> dict:
  """The inverse of `import_attention` for block i's params `p`."""
  D, H, N, Dh = (model[k] for k in ("d_model", "num_heads", "num_kv_heads", "head_dim"))
  b = f"model.layers.{i}."
  a, pa = b + "self_attn.", p["attn"]
  out = {b + "input_layernorm.weight": p["attn_norm"]["scale"],
         b + "post_attention_layernorm.weight": p["mlp_norm"]["scale"],
         a + "o_proj.weight": pa["o_kernel"].reshape(H * Dh, D).T}
  for n, h in {"q": H, "k": N, "v": N}.items():
    out[f"{a}{n}_proj.weight"] = pa[f"{n}_kernel"].reshape(D, h * Dh).T
    if f"{n}_bias" in pa:
      out[f"{a}{n}_proj.bias"] = pa[f"{n}_bias"].reshape(h * Dh)
    if n != "v" and f"{n}_norm" in pa:
      out[f"{a}{n}_norm.weight"] = pa[f"{n}_norm"]["scale"].reshape(-1)
  if "o_bias" in pa:
    out[a + "o_proj.bias"] = pa["o_bias"]
  return out


def zero_qkv_bias(p: dict, i: int) -> dict:
  """Zero q/k/v biases for block i (types that always have them), in the kernels' dtype."""
  a = f"model.layers.{i}.self_attn."
  return {f"{a}{n}_proj.bias": np.zeros(p["attn"][f"{n}_kernel"].shape[1:], p["attn"][
      f"{n}_kernel"].dtype).reshape(-1) for n in "qkv"}


def import_swiglu(t: Tensors, prefix: str, D: int, F: int, bias: bool) -> dict:
  """`prefix`{gate,up,down}_proj -> {w_gate, w_in, w_out} (+ b_gate, b_in, b_out)."""
  out = {"w_gate": t.get(prefix + "gate_proj.weight", (F, D)).T,
         "w_in": t.get(prefix + "up_proj.weight", (F, D)).T,
         "w_out": t.get(prefix + "down_proj.weight", (D, F)).T}
  if bias:
    out.update(b_gate=t.get(prefix + "gate_proj.bias", (F,)),
               b_in=t.get(prefix + "up_proj.bias", (F,)),
               b_out=t.get(prefix + "down_proj.bias", (D,)))
  return out


def export_swiglu(p: dict, prefix: str) -> dict:
  out = {prefix + "gate_proj.weight": p["w_gate"].T, prefix + "up_proj.weight": p["w_in"].T,
         prefix + "down_proj.weight": p["w_out"].T}
  for ours, theirs in (("b_gate", "gate_proj"), ("b_in", "up_proj"), ("b_out", "down_proj")):
    if ours in p:
      out[f"{prefix}{theirs}.bias"] = p[ours]
  return out


def contiguous(tensors: dict) -> dict:
  """The tensors as they are (views included, dtypes kept): `moe.convert.tensors.write_safetensors`
  makes each one row-major as it writes it, so the model is never copied whole."""
  return dict(tensors)


# ----------------------------------------------------------------------------- dense families


def _bias_fields(hf: dict, family: str, where: str) -> dict:
  if family == "qwen2":
    return {"qkv_bias": True}
  if family == "qwen3":
    if hf.get("attention_bias", False):
      raise ConfigError(f"{where}: Qwen3 attention_bias=True (q/k/v/o biases without MLP biases) "
                        "is not supported")
    return {"qk_norm": "head"}
  attn, mlp = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
  if attn != mlp:
    raise ConfigError(f"{where}: Llama attention_bias={attn} with mlp_bias={mlp} is not "
                      "supported (model.attention_bias biases attention and MLP together)")
  return {"attention_bias": attn}


def dense_to_params(hf: dict, t: Tensors, family: str):
  """A dense llama / qwen2 / qwen3 checkpoint -> (model fields, None, params)."""
  where = t.where
  check_silu(hf, where, family)
  model = shape_fields(hf, where)
  model.update(_bias_fields(hf, family, where))
  if family != "llama":
    model["sliding_window"] = sliding_window(hf, where)
  params = import_top(t, model)
  for i in range(model["num_layers"]):
    blk = import_attention(t, i, model)
    blk["mlp"] = import_swiglu(t, f"model.layers.{i}.mlp.", model["d_model"], model["d_ff"],
                               model["attention_bias"])
    params[f"block_{i}"] = blk
  return model, None, params


def llama_to_params(hf: dict, t: Tensors):
  return dense_to_params(hf, t, "llama")


def qwen2_to_params(hf: dict, t: Tensors):
  return dense_to_params(hf, t, "qwen2")


def qwen3_to_params(hf: dict, t: Tensors):
  return dense_to_params(hf, t, "qwen3")


def dense_type(model: dict) -> str:
  """The dense family a model trained here exports as: qwen3 with per-head QK-norm, qwen2 with
  q/k/v-only biases (or a sliding window), llama otherwise; a one-line ConfigError for the rest."""
  where = "--to_hf (dense)"
  refuse_unless(where, "Llama / Qwen2 / Qwen3", common_checks(model)
                + [("model.qk_norm", model.get("qk_norm"), (None, "head"))])
  if model.get("qk_norm") == "head":
    return "qwen3"
  if model.get("qkv_bias") or model.get("sliding_window") is not None:
    return "qwen2"
  return "llama"


def params_to_dense(model: dict, block, top: dict, family: str):
  """Our dense params -> (config.json, tensors) of `family` (llama / qwen2 / qwen3)."""
  where = f"--to_hf ({family})"
  qkv, attn_bias = bool(model.get("qkv_bias")), bool(model.get("attention_bias"))
  want = {"llama": [("model.qkv_bias", qkv and not attn_bias, (False,)),
                    ("model.qk_norm", model.get("qk_norm"), (None,)),
                    ("model.sliding_window", model.get("sliding_window"), (None,))],
          "qwen2": [("model.attention_bias", attn_bias, (False,)),
                    ("model.qk_norm", model.get("qk_norm"), (None,))],
          "qwen3": [("model.attention_bias", attn_bias, (False,)),
                    ("model.qkv_bias", qkv, (False,)),
                    ("model.qk_norm", model.get("qk_norm"), ("head",))]}[family]
  refuse_unless(where, DENSE_TYPES[family], common_checks(model) + want)
  out = export_top(model, top)
  for i in range(model["num_layers"]):
    p = block(i)
    out.update(export_attention(p, i, model))
    if family == "qwen2" and not qkv:  # Qwen2 always has q/k/v biases: zeros compute nothing
      out.update(zero_qkv_bias(p, i))
    out.update(export_swiglu(p["mlp"], f"model.layers.{i}.mlp."))
  config = shape_config(model)
  config.update(architectures=[DENSE_TYPES[family]], model_type=family)
  if family == "llama":
    config.update(attention_bias=attn_bias, mlp_bias=attn_bias, pretraining_tp=1)
  else:
    window = model.get("sliding_window")
    config.update(use_sliding_window=window is not None, sliding_window=window,
                  max_window_layers=0,
                  layer_types=["sliding_attention" if window is not None else "full_attention"]
                  * model["num_layers"])
    if family == "qwen3":
      config["attention_bias"] = False
  return config, contiguous(out)


def params_to_llama(model: dict, moe: dict | None, block, top: dict):
  return params_to_dense(model, block, top, "llama")


def params_to_qwen2(model: dict, moe: dict | None, block, top: dict):
  return params_to_dense(model, block, top, "qwen2")


def params_to_qwen3(model: dict, moe: dict | None, block, top: dict):
  return params_to_dense(model, block, top, "qwen3")

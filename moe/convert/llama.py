"""Dense Llama-layout decoders: `llama`, `qwen2`, `qwen3` (import and export). The tensor mapping
(embedding, norms, q/k/v/o, SwiGLU) is `moe.convert.decoder`'s, shared with the MoE families.

Names: see `moe.convert.layouts` and `moe.convert.decoder`; per block
mlp.{gate,up,down}_proj -> mlp/{w_gate, w_in, w_out} (+ b_*).

The families differ in their biases and QK-norm:
  llama: attention_bias (q/k/v/o) together with mlp_bias -> model.attention_bias (which biases
         both; one without the other is refused);
  qwen2: q/k/v biases always -> model.qkv_bias;
  qwen3: QK-norm per head -> model.qk_norm="head" (attention_bias=True is refused).
Arrays keep their stored dtype (only transposes and reshapes here).
"""

from __future__ import annotations

from moe.convert.decoder import (check_silu, common_checks, contiguous, export_attention,
                                 export_swiglu, export_top, import_attention, import_swiglu,
                                 import_top, refuse_unless, shape_config, shape_fields,
                                 zero_qkv_bias)
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

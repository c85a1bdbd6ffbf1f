"""OLMoE (`olmoe`) and Qwen3-MoE (`qwen3_moe`): import and export, and which MoE type a model
trained here exports as (`moe_type`). Names: see `moe.convert.layouts`; the attention, norms and
SwiGLU pieces are `moe.convert.decoder`'s.

Both route with a softmax over E experts, top-K, and divide the K weights by their sum when
`norm_topk_prob` (-> moe.renormalize); experts are SwiGLU: mlp.experts.<e>.gate_proj -> w_gate,
up_proj -> w_in, down_proj -> w_out; the router mlp.gate -> moe/router/kernel. They differ in:
  olmoe: QK-norm over the whole q and k projections (model.qk_norm="full"), every block MoE
         with expert width intermediate_size;
  qwen3_moe: QK-norm per head (model.qk_norm="head"), expert width moe_intermediate_size; block
         i is MoE unless i is in mlp_only_layers or (i + 1) % decoder_sparse_step != 0, which
         maps to model.first_moe_layer / moe_interval where that pattern is one of ours (a dense
         block is a SwiGLU MLP of width intermediate_size).
Import routes dropless (capacity_factor None), as transformers does. `router_aux_loss_coef` <->
moe.load_balance_weight as is, as for Mixtral (a fine-tuning weight, not part of the function:
transformers' term counts f_e over the K choices, so it sums to K, and pools the layers, where
ours sums to 1 and adds the layers' losses; the same weight is (MoE blocks / K) times stronger
here). Neither config stores a z-loss weight (OLMoE trained with one, outside transformers), so
moe.z_loss_weight is 0 on import.
"""

from __future__ import annotations

from moe.convert import decoder
from moe.convert.tensors import Tensors, need
from moe.errors import ConfigError

MOE_TYPES = {"olmoe": "OlmoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def _moe_fields(hf: dict, E: int, K: int, F: int) -> dict:
  return dict(enabled=True, num_experts=E, num_selected=K, expert_hidden=F, capacity_factor=None,
              eval_capacity_factor=None, renormalize=bool(hf.get("norm_topk_prob", False)),
              router="token_choice", priority="choice_major", expert_mlp="swiglu",
              num_shared_experts=0, jitter_eps=0.0,
              load_balance_weight=float(hf.get("router_aux_loss_coef", 1e-2)), z_loss_weight=0.0,
              bias_balancing=False, router_dtype="float32")


def moe_layout(hf: dict, num_layers: int, where: str) -> tuple[int, int]:
  """Qwen3-MoE's sparse blocks -> (first_moe_layer, moe_interval), or a one-line refusal."""
  sparse = decoder.sparse_blocks(hf, num_layers)
  if not sparse:
    raise ConfigError(f"{where}: no MoE block (decoder_sparse_step="
                      f"{int(hf.get('decoder_sparse_step', 1) or 1)}, mlp_only_layers="
                      f"{sorted(hf.get('mlp_only_layers') or [])}); import it as a dense model "
                      "instead")
  return decoder.moe_placement(hf, sparse, num_layers, where)


def moe_to_params(hf: dict, t: Tensors, family: str):
  """An olmoe / qwen3_moe checkpoint -> (model fields, moe fields, params)."""
  where = t.where
  decoder.check_silu(hf, where, family)
  for key in ("attention_bias", "clip_qkv"):
    if hf.get(key):
      raise ConfigError(f"{where}: {family} {key}={hf[key]!r} is not supported")
  model = decoder.shape_fields(hf, where)
  E = hf.get("num_experts") or need(hf, "num_local_experts", where)
  K = need(hf, "num_experts_per_tok", where)
  if family == "olmoe":
    F = model["d_ff"]
    model.update(qk_norm="full", moe_interval=1, first_moe_layer=0)
  else:
    F = need(hf, "moe_intermediate_size", where)
    first, interval = moe_layout(hf, model["num_layers"], where)
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    model.update(qk_norm="head", moe_interval=interval, first_moe_layer=first,
                 sliding_window=window)
  moe = _moe_fields(hf, E, K, F)
  is_moe = lambda i: i >= model["first_moe_layer"] and (  # noqa: E731
      (i - model["first_moe_layer"]) % model["moe_interval"] == 0)
  params = decoder.import_top(t, model)
  D = model["d_model"]
  for i in range(model["num_layers"]):
    blk = decoder.import_attention(t, i, model)
    if is_moe(i):
      blk["moe"] = decoder.import_moe(t, f"model.layers.{i}.mlp.", D, E, F)
    else:
      blk["mlp"] = decoder.import_swiglu(t, f"model.layers.{i}.mlp.", D, model["d_ff"], False)
    params[f"block_{i}"] = blk
  return model, moe, params


def olmoe_to_params(hf: dict, t: Tensors):
  return moe_to_params(hf, t, "olmoe")


def qwen3_moe_to_params(hf: dict, t: Tensors):
  return moe_to_params(hf, t, "qwen3_moe")


# ----------------------------------------------------------------------------- export


def routing_checks(moe: dict) -> list:
  """What softmax top-K routing without shared experts needs of the `moe` group (the routing no
  type of this module can express, each refused naming its setting)."""
  return [("moe.router", moe.get("router", "token_choice"), ("token_choice",)),
          ("moe.priority", moe.get("priority", "choice_major"), ("choice_major",)),
          ("moe.expert_mlp", moe.get("expert_mlp", "swiglu"), ("swiglu",)),
          ("moe.num_shared_experts", moe.get("num_shared_experts", 0), (0,)),
          ("moe.bias_balancing", bool(moe.get("bias_balancing", False)), (False,)),
          ("moe.score_func", moe.get("score_func", "softmax"), ("softmax",)),
          ("moe.routed_scale", float(moe.get("routed_scale", 1.0)), (1.0,)),
          ("moe.num_groups", moe.get("num_groups", 1), (1,))]


def moe_type(model: dict, moe: dict) -> str:
  """The MoE type a model trained here (standard attention, no shared experts) exports as:
  olmoe with model.qk_norm="full", qwen3_moe with "head"; without QK-norm mixtral, which needs
  renormalised top-K in every block. Anything else: a one-line ConfigError naming the setting."""
  where = "--to_hf (MoE)"
  decoder.refuse_unless(where, "Mixtral / OLMoE / Qwen3-MoE",
                        decoder.common_checks(model) + routing_checks(moe))
  qk = model.get("qk_norm")
  if qk == "full":
    return "olmoe"
  if qk == "head":
    return "qwen3_moe"
  for name, have, want in (("moe.renormalize", moe.get("renormalize", True), True),
                           ("model.moe_interval", model.get("moe_interval", 1), 1),
                           ("model.first_moe_layer", model.get("first_moe_layer", 0), 0),
                           ("model.qkv_bias", bool(model.get("qkv_bias", False)), False)):
    if have != want:
      raise ConfigError(f"{where}: {name}={have!r} with model.qk_norm=None: Mixtral needs "
                        f"{name}={want!r} and OLMoE / Qwen3-MoE need QK-norm (train with "
                        "model.qk_norm='head' to export as qwen3_moe)")
  return "mixtral"


def params_to_moe(model: dict, moe: dict, block, top: dict, family: str):
  """Our MoE params -> (config.json, tensors) of `family` (olmoe / qwen3_moe)."""
  where = f"--to_hf ({family})"
  D, H, Dh, L = (model[k] for k in ("d_model", "num_heads", "head_dim", "num_layers"))
  checks = decoder.common_checks(model) + routing_checks(moe) + [
      ("model.attention_bias", bool(model.get("attention_bias")), (False,)),
      ("model.qkv_bias", bool(model.get("qkv_bias")), (False,)),
      ("model.qk_norm", model.get("qk_norm"), ("full" if family == "olmoe" else "head",))]
  if family == "olmoe":
    checks += [("model.moe_interval", model.get("moe_interval", 1), (1,)),
               ("model.first_moe_layer", model.get("first_moe_layer", 0), (0,)),
               ("model.sliding_window", model.get("sliding_window"), (None,)),
               ("model.num_heads * model.head_dim", H * Dh, (D,))]
  decoder.refuse_unless(where, MOE_TYPES[family], checks)
  first, interval = model.get("first_moe_layer", 0), model.get("moe_interval", 1)
  is_moe = lambda i: i >= first and (i - first) % interval == 0  # noqa: E731
  out = decoder.export_top(model, top)
  for i in range(L):
    p = block(i)
    out.update(decoder.export_attention(p, i, model))
    if is_moe(i):
      out.update(decoder.export_moe(p["moe"], f"model.layers.{i}.mlp."))
    else:
      out.update(decoder.export_swiglu(p["mlp"], f"model.layers.{i}.mlp."))
  config = decoder.shape_config(model)
  E, K, F = moe["num_experts"], moe["num_selected"], moe["expert_hidden"]
  config.update(architectures=[MOE_TYPES[family]], model_type=family, num_experts=E,
                num_experts_per_tok=K, norm_topk_prob=bool(moe.get("renormalize", True)),
                router_aux_loss_coef=float(moe.get("load_balance_weight", 1e-2)),
                output_router_logits=False, attention_bias=False)
  if family == "olmoe":
    config.update(intermediate_size=F, clip_qkv=None)
    del config["head_dim"]  # OLMoE's is hidden_size // num_attention_heads
  else:
    window = model.get("sliding_window")
    config.update(moe_intermediate_size=F, decoder_sparse_step=1,
                  mlp_only_layers=[i for i in range(L) if not is_moe(i)],
                  use_sliding_window=window is not None, sliding_window=window)
  return config, decoder.contiguous(out)


def params_to_olmoe(model: dict, moe: dict, block, top: dict):
  return params_to_moe(model, moe, block, top, "olmoe")


def params_to_qwen3_moe(model: dict, moe: dict, block, top: dict):
  return params_to_moe(model, moe, block, top, "qwen3_moe")

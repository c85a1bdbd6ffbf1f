"""Hugging Face <-> project parameter layouts: the registry of architectures (used by moe.convert).

One module per family holds its import (`<family>_to_params(hf, tensors) -> (model fields, moe
fields or None, params tree)`) and export (`params_to_<family>(model, moe, block, top) ->
(config.json dict, {name: array})`); this module lists them. The params tree uses this project's
names (see moe/model/transformer.py):

  embedding_table [V, D]; pos_embedding [max_len, D] (learned positions); final_norm/{scale,bias};
  output_kernel [D, V] (untied); block_<i>/{attn_norm, mlp_norm}/{scale, bias};
  block_<i>/attn/{q,k,v}_kernel [D, H|N, Dh], {q,k,v}_bias [H|N, Dh], o_kernel [H, Dh, D], o_bias [D];
  block_<i>/mlp/{w_in, w_gate} [D, F], w_out [F, D], b_in [F], b_out [D];
  block_<i>/moe/router/kernel [D, E]; block_<i>/moe/experts/{w_in, w_gate} [E, D, F], w_out [E, F, D];
  block_<i>/moe/shared/{w_in, w_gate} [D, S*F], w_out [S*F, D]; MLA: see moe/convert/deepseek.py.

An importer returns (model fields, moe fields or None, params) or, when the model has a `moe_bias`
collection (DeepSeek-V3's correction bias), (..., params, moe_bias); an exporter's `block(i)` then
carries block i's `moe_bias` subtree under the key "moe_bias".

PyTorch `nn.Linear` weights are [out, in] (transposed by the family modules).

`export_type(model, moe)` picks the Hugging Face type a model trained here is exported as (the
closest one that computes the same function; DeepSeek-V3 for a sigmoid router with MLA,
DeepSeek-V2 for MLA with softmax scores), or raises a one-line ConfigError naming the setting
no supported type can express.
"""

from __future__ import annotations

from moe.convert import gpt2, llama, mixtral, olmoe
from moe.convert import qwen2_moe
from moe.convert import deepseek
from moe.convert.tensors import Tensors

from moe.errors import ConfigError

__all__ = ["Tensors", "SUPPORTED", "IMPORTERS", "EXPORTERS", "export_type"]

# model_type -> what is supported, as the error for an unsupported type lists it.
SUPPORTED = {"gpt2": "GPT2LMHeadModel (import)", "mixtral": "MixtralForCausalLM (import, export)",
             "llama": "LlamaForCausalLM (import, export)",
             "qwen2": "Qwen2ForCausalLM (import, export)",
             "qwen3": "Qwen3ForCausalLM (import, export)",
             "olmoe": "OlmoeForCausalLM (import, export)",
             "qwen3_moe": "Qwen3MoeForCausalLM (import, export)"}
SUPPORTED["qwen2_moe"] = "Qwen2MoeForCausalLM (import, export)"

IMPORTERS = {"gpt2": gpt2.gpt2_to_params, "mixtral": mixtral.mixtral_to_params,
             "llama": llama.llama_to_params, "qwen2": llama.qwen2_to_params,
             "qwen3": llama.qwen3_to_params, "olmoe": olmoe.olmoe_to_params,
             "qwen3_moe": olmoe.qwen3_moe_to_params}
IMPORTERS["qwen2_moe"] = qwen2_moe.qwen2_moe_to_params
EXPORTERS = {"mixtral": mixtral.params_to_mixtral, "llama": llama.params_to_llama,
             "qwen2": llama.params_to_qwen2, "qwen3": llama.params_to_qwen3,
             "olmoe": olmoe.params_to_olmoe, "qwen3_moe": olmoe.params_to_qwen3_moe}
EXPORTERS["qwen2_moe"] = qwen2_moe.params_to_qwen2_moe
SUPPORTED["deepseek_v3"] = "DeepseekV3ForCausalLM (import, export)"
SUPPORTED["deepseek_v2"] = "DeepseekV2ForCausalLM (import, export)"
IMPORTERS["deepseek_v3"] = deepseek.deepseek_v3_to_params
IMPORTERS["deepseek_v2"] = deepseek.deepseek_v2_to_params
EXPORTERS["deepseek_v3"] = deepseek.params_to_deepseek_v3
EXPORTERS["deepseek_v2"] = deepseek.params_to_deepseek_v2


def export_type(model: dict, moe: dict | None) -> str:
  """The Hugging Face model_type a model with these `model` / `moe` groups is exported as."""
  if moe is None or not moe.get("enabled", True):
    if model.get("attention", "mha") == "mla":
      raise ConfigError("--to_hf: model.attention='mla' in a dense model has no supported "
                        "Hugging Face type (DeepSeek-V2/V3 export needs MoE blocks)")
    # Dense: llama; qwen2 with q/k/v-only biases or a sliding window; qwen3 with QK-norm "head".
    return llama.dense_type(model)
  deepseek_type = _deepseek_type(model, moe)  # MLA or a sigmoid router
  if deepseek_type:
    return deepseek_type
  if moe.get("num_shared_experts") and qwen2_moe.export_refusal(model, moe) is None:
    return "qwen2_moe"  # shared experts (gate or not): see moe/convert/qwen2_moe.py
  if (model.get("qk_norm") is None and not _mixtral_expresses(model, moe)
      and qwen2_moe.export_refusal(model, moe) is None):
    # Unnormalised top-K, dense blocks or q/k/v biases without QK-norm: Qwen2-MoE with a
    # zero-width shared expert (norm_topk_prob, mlp_only_layers and qkv_bias express them).
    return "qwen2_moe"
  # Softmax top-K, standard attention, no shared experts: mixtral (renormalised, every block
  # MoE, no QK-norm), qwen3_moe (QK-norm "head"; norm_topk_prob = moe.renormalize, dense blocks
  # via mlp_only_layers) or olmoe (QK-norm "full").
  return olmoe.moe_type(model, moe)


def _mixtral_expresses(model: dict, moe: dict) -> bool:
  """Renormalised top-K in every block, no q/k/v biases: what Mixtral needs beyond the common
  checks (olmoe.moe_type has the rest and its errors)."""
  return (moe.get("renormalize", True) and model.get("moe_interval", 1) == 1
          and model.get("first_moe_layer", 0) == 0 and not model.get("qkv_bias", False))


def _deepseek_type(model: dict, moe: dict) -> str | None:
  """deepseek_v3 for a sigmoid router (with or without its selection bias), deepseek_v2 for MLA
  with softmax scores, None when neither applies; what neither can express is an error."""
  mla = model.get("attention", "mha") == "mla"
  sigmoid = moe.get("score_func", "softmax") == "sigmoid"
  if not (mla or sigmoid):
    return None
  if not mla:
    raise ConfigError("--to_hf: moe.score_func='sigmoid' exports as DeepSeek-V3, which needs "
                      "model.attention='mla' (got 'mha')")
  if sigmoid:
    return "deepseek_v3"
  if moe.get("bias_balancing"):
    raise ConfigError("--to_hf: moe.bias_balancing=True with moe.score_func='softmax' has no "
                      "equivalent (DeepSeek-V3's correction bias needs score_func='sigmoid')")
  return "deepseek_v2"

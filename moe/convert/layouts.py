"""Hugging Face <-> project parameter layouts: the registry of architectures (used by moe.convert).

One module per family holds its import (`<family>_to_params(hf, tensors) -> (model fields, moe
fields or None, params tree)`) and export (`params_to_<family>(model, moe, block, top) ->
(config.json dict, {name: array})`); this module lists them. The params tree uses this project's
names (see moe/model/transformer.py):

  embedding_table [V, D]; pos_embedding [max_len, D] (learned positions); final_norm/{scale,bias};
  output_kernel [D, V] (untied); block_<i>/{attn_norm, mlp_norm}/{scale, bias};
  block_<i>/attn/{q,k,v}_kernel [D, H|N, Dh], {q,k,v}_bias [H|N, Dh], o_kernel [H, Dh, D], o_bias [D];
  block_<i>/mlp/{w_in, w_gate} [D, F], w_out [F, D], b_in [F], b_out [D];
  block_<i>/moe/router/kernel [D, E]; block_<i>/moe/experts/{w_in, w_gate} [E, D, F], w_out [E, F, D].

PyTorch `nn.Linear` weights are [out, in] (transposed by the family modules).

`export_type(model, moe)` picks the Hugging Face type a model trained here is exported as (the
closest one that computes the same function), or raises a one-line ConfigError naming the setting
no supported type can express.
"""

from __future__ import annotations

from moe.convert import gpt2, mixtral
from moe.convert import qwen2_moe
from moe.convert.tensors import Tensors

__all__ = ["Tensors", "SUPPORTED", "IMPORTERS", "EXPORTERS", "export_type"]
from moe.errors import ConfigError

# model_type -> what is supported, as the error for an unsupported type lists it.
SUPPORTED = {"gpt2": "GPT2LMHeadModel (import)", "mixtral": "MixtralForCausalLM (import, export)"}
SUPPORTED["qwen2_moe"] = "Qwen2MoeForCausalLM (import, export)"

IMPORTERS = {"gpt2": gpt2.gpt2_to_params, "mixtral": mixtral.mixtral_to_params}
IMPORTERS["qwen2_moe"] = qwen2_moe.qwen2_moe_to_params
EXPORTERS = {"mixtral": mixtral.params_to_mixtral}
EXPORTERS["qwen2_moe"] = qwen2_moe.params_to_qwen2_moe


def export_type(model: dict, moe: dict | None) -> str:
  """The Hugging Face model_type a model with these `model` / `moe` groups is exported as."""
  if moe is None or not moe.get("enabled", True):
    raise ConfigError("--to_hf: the model is dense; export supports MoE models only (supported: "
                      + ", ".join(f"{k}: {v}" for k, v in SUPPORTED.items()) + ")")
  if moe.get("num_shared_experts") and qwen2_moe.export_refusal(model, moe) is None:
    return "qwen2_moe"  # shared experts (gate or not): see moe/convert/qwen2_moe.py
  if moe.get("bias_balancing"):
    raise ConfigError("--to_hf: moe.bias_balancing=True (a selection bias) has no Mixtral "
                      "equivalent")
  return "mixtral"

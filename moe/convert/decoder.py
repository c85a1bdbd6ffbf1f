"""The Llama-style decoder skeleton every Hugging Face family here except GPT-2 shares: embedding,
final norm and lm_head; per block input_layernorm / post_attention_layernorm; q/k/v/o projections
(biases and QK-norm where the `model` group has them); SwiGLU MLPs and stacks of SwiGLU experts;
and the `model` fields and export checks of that layout.

Its own module rather than `moe.convert.llama`: Llama is only one of the families built on it
(Qwen2/Qwen3 dense in `llama`, Mixtral, Qwen2-MoE, OLMoE / Qwen3-MoE, and DeepSeek, whose MLA
attention is its own but whose top, norms and MLPs are these), so naming the home after one of
them would send a reader to the wrong file.

Names: see `moe.convert.layouts`. PyTorch `nn.Linear` weights are [out, in] (transposed here).
Per block: input_layernorm -> attn_norm, post_attention_layernorm -> mlp_norm;
self_attn.{q,k,v,o}_proj (+ .bias) -> attn/{q,k,v,o}_kernel (+ _bias);
self_attn.{q,k}_norm -> attn/{q,k}_norm/scale (QK-norm, `model.qk_norm`);
<prefix>gate_proj -> w_gate (silu side), up_proj -> w_in, down_proj -> w_out (+ b_*); Mixtral
names its experts' three w1 / w3 / w2 (`MIXTRAL_EXPERT`).
Arrays keep their stored dtype (only transposes, reshapes and stacks here).
"""

from __future__ import annotations

import numpy as np

from moe.convert.rope import rope_config, rope_fields
from moe.convert.tensors import Tensors, need
from moe.errors import ConfigError

# (ours, Hugging Face's) for the three SwiGLU projections: gate (silu side), up, down.
SWIGLU = (("w_gate", "gate_proj"), ("w_in", "up_proj"), ("w_out", "down_proj"))
MIXTRAL_EXPERT = (("w_gate", "w1"), ("w_in", "w3"), ("w_out", "w2"))
_BIAS = {"w_gate": "b_gate", "w_in": "b_in", "w_out": "b_out"}


# ----------------------------------------------------------------------------- config fields


def check_silu(hf: dict, where: str, family: str) -> None:
  if hf.get("hidden_act", "silu") != "silu":
    raise ConfigError(f"{where}: {family} hidden_act={hf.get('hidden_act')!r} is not supported "
                      "(SwiGLU with silu only)")


def shape_fields(hf: dict, where: str, eps: float = 1e-6, theta: float = 10000.0) -> dict:
  """The `model` fields every family of this layout shares (no biases, no QK-norm); eps and
  theta: the family's rms_norm_eps and rope_theta when config.json has none."""
  D, L = need(hf, "hidden_size", where), need(hf, "num_hidden_layers", where)
  H = need(hf, "num_attention_heads", where)
  return dict(vocab_size=need(hf, "vocab_size", where), d_model=D, num_layers=L, num_heads=H,
              num_kv_heads=hf.get("num_key_value_heads") or H,
              head_dim=hf.get("head_dim") or D // H,
              d_ff=need(hf, "intermediate_size", where),
              max_len=int(hf.get("max_position_embeddings", 4096)), norm="rms",
              norm_eps=float(hf.get("rms_norm_eps", eps)), positions="rope",
              **rope_fields(hf, where, theta), mlp_activation="swiglu",
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


def sparse_blocks(hf: dict, num_layers: int) -> list[int]:
  """The blocks Qwen2-MoE / Qwen3-MoE build as MoE blocks: block i unless it is in
  `mlp_only_layers` or (i + 1) % `decoder_sparse_step` != 0."""
  step = int(hf.get("decoder_sparse_step", 1) or 1)
  dense = set(hf.get("mlp_only_layers") or [])
  return [i for i in range(num_layers) if i not in dense and (i + 1) % step == 0]


def moe_placement(hf: dict, sparse: list[int], num_layers: int, where: str) -> tuple[int, int]:
  """(first_moe_layer, moe_interval) giving exactly the MoE blocks `sparse` (not empty), or a
  one-line refusal naming them."""
  first = sparse[0]
  interval = sparse[1] - first if len(sparse) > 1 else max(1, num_layers - first)
  if list(range(first, num_layers, interval)) != sparse:
    dense = sorted(hf.get("mlp_only_layers") or [])
    raise ConfigError(f"{where}: MoE blocks at layers {sparse} (decoder_sparse_step="
                      f"{hf.get('decoder_sparse_step', 1)}, mlp_only_layers={dense}) are not "
                      "every n-th block from one on; model.first_moe_layer / moe_interval "
                      "cannot express them")
  return first, interval


# ----------------------------------------------------------------------------- tensors


def import_top(t: Tensors, model: dict, saved_tied_head: bool = True) -> dict:
  """Embedding, final norm and (untied) lm_head. saved_tied_head: a tied head saved anyway is
  accepted when it is the embedding matrix (False: it is left unused, so the import refuses it,
  as Mixtral, Qwen2-MoE and DeepSeek always have)."""
  V, D = model["vocab_size"], model["d_model"]
  params = {"embedding_table": t.get("model.embed_tokens.weight", (V, D)),
            "final_norm": {"scale": t.get("model.norm.weight", (D,))}}
  if not model["tie_embeddings"]:
    params["output_kernel"] = t.get("lm_head.weight", (V, D)).T
  elif saved_tied_head and "lm_head.weight" in t:  # a tied head saved anyway: the same matrix
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


def import_block(t: Tensors, i: int, D: int, attn: dict) -> dict:
  """Block i's attn_norm and mlp_norm around its `attn` params."""
  b = f"model.layers.{i}."
  return {"attn_norm": {"scale": t.get(b + "input_layernorm.weight", (D,))}, "attn": attn,
          "mlp_norm": {"scale": t.get(b + "post_attention_layernorm.weight", (D,))}}


def export_norms(p: dict, i: int) -> dict:
  """Block i's two norms (the inverse of `import_block`'s)."""
  b = f"model.layers.{i}."
  return {b + "input_layernorm.weight": p["attn_norm"]["scale"],
          b + "post_attention_layernorm.weight": p["mlp_norm"]["scale"]}


def import_attention(t: Tensors, i: int, model: dict) -> dict:
  """Block i's attn_norm, attn and mlp_norm params (biases and QK-norm as `model` says)."""
  D, H, N, Dh = (model[k] for k in ("d_model", "num_heads", "num_kv_heads", "head_dim"))
  a = f"model.layers.{i}.self_attn."
  heads = {"q": H, "k": N, "v": N}
  attn = {f"{n}_kernel": t.get(f"{a}{n}_proj.weight", (h * Dh, D)).T.reshape(D, h, Dh)
          for n, h in heads.items()}
  attn["o_kernel"] = t.get(a + "o_proj.weight", (D, H * Dh)).T.reshape(H, Dh, D)
  if model.get("attention_bias") or model.get("qkv_bias"):
    for n, h in heads.items():
      attn[f"{n}_bias"] = t.get(f"{a}{n}_proj.bias", (h * Dh,)).reshape(h, Dh)
  if model.get("attention_bias"):
    attn["o_bias"] = t.get(a + "o_proj.bias", (D,))
  if model.get("qk_norm") == "head":
    for n in "qk":
      attn[f"{n}_norm"] = {"scale": t.get(f"{a}{n}_norm.weight", (Dh,))}
  elif model.get("qk_norm") == "full":
    for n in "qk":
      attn[f"{n}_norm"] = {"scale": t.get(f"{a}{n}_norm.weight",
                                          (heads[n] * Dh,)).reshape(heads[n], Dh)}
  return import_block(t, i, D, attn)


def export_attention(p: dict, i: int, model: dict) -> dict:
  """The inverse of `import_attention` for block i's params `p`."""
  D, H, N, Dh = (model[k] for k in ("d_model", "num_heads", "num_kv_heads", "head_dim"))
  a, pa = f"model.layers.{i}.self_attn.", p["attn"]
  out = export_norms(p, i)
  out[a + "o_proj.weight"] = pa["o_kernel"].reshape(H * Dh, D).T
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


def import_swiglu(t: Tensors, prefix: str, D: int, F: int, bias: bool = False,
                  names=SWIGLU) -> dict:
  """`prefix`{gate,up,down}_proj (or `names`' projections) -> {w_gate, w_in, w_out}
  (+ b_gate, b_in, b_out)."""
  shapes = {"w_gate": (F, D), "w_in": (F, D), "w_out": (D, F)}
  out = {ours: t.get(f"{prefix}{theirs}.weight", shapes[ours]).T for ours, theirs in names}
  if bias:
    out.update({_BIAS[ours]: t.get(f"{prefix}{theirs}.bias", shapes[ours][:1])
                for ours, theirs in names})
  return out


def export_swiglu(p: dict, prefix: str, names=SWIGLU) -> dict:
  out = {f"{prefix}{theirs}.weight": p[ours].T for ours, theirs in names}
  for ours, theirs in names:
    if _BIAS[ours] in p:
      out[f"{prefix}{theirs}.bias"] = p[_BIAS[ours]]
  return out


def import_experts(t: Tensors, m: str, D: int, E: int, F: int, names=SWIGLU) -> dict:
  """`m`experts.<e>.* for e < E, each a SwiGLU -> {w_gate, w_in, w_out}, stacked [E, ...]
  (filled expert by expert: one expert's tensor is alive besides the stacks, not the layer's)."""
  shapes = {"w_gate": (F, D), "w_in": (F, D), "w_out": (D, F)}
  out = {}
  for ours, theirs in names:
    for e in range(E):
      x = t.get(f"{m}experts.{e}.{theirs}.weight", shapes[ours]).T
      if e == 0:
        stack = np.empty((E, *x.shape), x.dtype)
      elif x.dtype != stack.dtype:  # as np.stack would: the common dtype
        stack = stack.astype(np.result_type(stack.dtype, x.dtype))
      stack[e] = x
    out[ours] = stack
  return out


def export_experts(ex: dict, m: str, names=SWIGLU) -> dict:
  """The inverse of `import_experts` (E from the stack)."""
  out = {}
  for e in range(ex["w_in"].shape[0]):
    out.update(export_swiglu({ours: ex[ours][e] for ours, _ in names}, f"{m}experts.{e}.",
                             names))
  return out


def import_moe(t: Tensors, m: str, D: int, E: int, F: int, names=SWIGLU) -> dict:
  """`m`gate (the router, [E, D]) and its E SwiGLU experts -> {router, experts}."""
  return {"router": {"kernel": t.get(m + "gate.weight", (E, D)).T},
          "experts": import_experts(t, m, D, E, F, names)}


def export_moe(p: dict, m: str, names=SWIGLU) -> dict:
  """The inverse of `import_moe`."""
  return {m + "gate.weight": p["router"]["kernel"].T, **export_experts(p["experts"], m, names)}


def contiguous(tensors: dict) -> dict:
  """The tensors as they are (views included, dtypes kept): `moe.convert.tensors.write_safetensors`
  makes each one row-major as it writes it, so the model is never copied whole."""
  return dict(tensors)

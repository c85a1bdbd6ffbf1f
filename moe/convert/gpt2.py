"""GPT-2 (`gpt2`, GPT2LMHeadModel): import. Parameter names: see `moe.convert.layouts`.

GPT-2's `Conv1D` weights are already [in, out]; q, k and v come fused in `c_attn`.
"""

from __future__ import annotations

import numpy as np

from moe.convert.tensors import Tensors, need as _need
from moe.errors import ConfigError


def gpt2_to_params(hf: dict, t: Tensors):
  where = t.where
  act = hf.get("activation_function", "gelu_new")
  if act not in ("gelu_new", "gelu_pytorch_tanh"):
    raise ConfigError(f"{where}: GPT-2 activation_function={act!r} is not supported (this "
                      "project's GELU is the tanh approximation: gelu_new / gelu_pytorch_tanh)")
  for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
    if hf.get(flag):
      raise ConfigError(f"{where}: GPT-2 {flag}=True is not supported")
  if hf.get("scale_attn_weights", True) is False:
    raise ConfigError(f"{where}: GPT-2 scale_attn_weights=False is not supported")
  D, L, H = _need(hf, "n_embd", where), _need(hf, "n_layer", where), _need(hf, "n_head", where)
  V, P = _need(hf, "vocab_size", where), _need(hf, "n_positions", where)
  F = hf.get("n_inner") or 4 * D
  if D % H:
    raise ConfigError(f"{where}: n_embd={D} is not divisible by n_head={H}")
  Dh = D // H
  prefix = "transformer." if "transformer.wte.weight" in t else ""
  g = lambda name, shape=None: t.get(prefix + name, shape)  # noqa: E731

  def norm(name):
    return {"scale": g(f"{name}.weight", (D,)), "bias": g(f"{name}.bias", (D,))}

  params = {"embedding_table": g("wte.weight", (V, D)), "pos_embedding": g("wpe.weight", (P, D)),
            "final_norm": norm("ln_f")}
  for i in range(L):
    b = f"h.{i}."
    qkv_w = g(b + "attn.c_attn.weight", (D, 3 * D))
    qkv_b = g(b + "attn.c_attn.bias", (3 * D,))
    attn = {}
    for j, n in enumerate("qkv"):
      attn[f"{n}_kernel"] = qkv_w[:, j * D:(j + 1) * D].reshape(D, H, Dh)
      attn[f"{n}_bias"] = qkv_b[j * D:(j + 1) * D].reshape(H, Dh)
    attn["o_kernel"] = g(b + "attn.c_proj.weight", (D, D)).reshape(H, Dh, D)
    attn["o_bias"] = g(b + "attn.c_proj.bias", (D,))
    params[f"block_{i}"] = {
        "attn_norm": norm(b + "ln_1"), "attn": attn, "mlp_norm": norm(b + "ln_2"),
        "mlp": {"w_in": g(b + "mlp.c_fc.weight", (D, F)), "b_in": g(b + "mlp.c_fc.bias", (F,)),
                "w_out": g(b + "mlp.c_proj.weight", (F, D)),
                "b_out": g(b + "mlp.c_proj.bias", (D,))}}
  if "lm_head.weight" in t:  # tied: the same matrix as wte when present at all
    head = t.get("lm_head.weight", (V, D))
    if not np.array_equal(head, params["embedding_table"]):
      raise ConfigError(f"{where}: GPT-2 lm_head.weight differs from wte.weight (untied heads "
                        "are not supported for GPT-2)")
  model = dict(vocab_size=V, d_model=D, num_layers=L, num_heads=H, num_kv_heads=H, head_dim=Dh,
               d_ff=F, max_len=P, norm="layer", norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
               positions="learned", mlp_activation="gelu", attention_bias=True,
               tie_embeddings=True, sliding_window=None)
  # Ignored buffers of old checkpoints (causal-mask tables), not parameters.
  for name in t.unused():
    if name.endswith(".attn.bias") or name.endswith(".attn.masked_bias"):
      t.used.add(name)
  return model, None, params

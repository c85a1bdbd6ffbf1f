"""Hugging Face <-> project parameter layouts, per architecture (numpy only; used by moe.convert).

Supported: GPT-2 (`gpt2`, GPT2LMHeadModel; import) and Mixtral (`mixtral`, MixtralForCausalLM;
import and export). Each importer returns (model fields, moe fields or None, params tree) where
the params tree uses this project's names (see moe/model/transformer.py):

  embedding_table [V, D]; pos_embedding [max_len, D] (learned positions); final_norm/{scale,bias};
  output_kernel [D, V] (untied); block_<i>/{attn_norm, mlp_norm}/{scale, bias};
  block_<i>/attn/{q,k,v}_kernel [D, H|N, Dh], {q,k,v}_bias [H|N, Dh], o_kernel [H, Dh, D], o_bias [D];
  block_<i>/mlp/{w_in, w_gate} [D, F], w_out [F, D], b_in [F], b_out [D];
  block_<i>/moe/router/kernel [D, E]; block_<i>/moe/experts/{w_in, w_gate} [E, D, F], w_out [E, F, D].

PyTorch `nn.Linear` weights are [out, in] (transposed here); GPT-2's `Conv1D` weights are already
[in, out]. Mixtral experts: w1 = gate (silu side) -> w_gate, w3 = up -> w_in, w2 = down -> w_out.
"""

from __future__ import annotations

import numpy as np

from moe.errors import ConfigError

SUPPORTED = {"gpt2": "GPT2LMHeadModel (import)", "mixtral": "MixtralForCausalLM (import, export)"}


class Tensors:
  """Name -> float32 array, with one-line errors naming a missing tensor; tracks what was used."""

  def __init__(self, tensors: dict[str, np.ndarray], where: str):
    self._t = tensors
    self.where = where
    self.used: set[str] = set()

  def __contains__(self, name):
    return name in self._t

  def get(self, name: str, shape: tuple | None = None) -> np.ndarray:
    if name not in self._t:
      raise ConfigError(f"{self.where}: tensor {name!r} is missing from the safetensors files")
    x = np.asarray(self._t[name], np.float32)
    if shape is not None and tuple(x.shape) != tuple(shape):
      raise ConfigError(f"{self.where}: tensor {name!r} has shape {tuple(x.shape)}, config.json "
                        f"implies {tuple(shape)}")
    self.used.add(name)
    return x

  def unused(self) -> list[str]:
    return sorted(set(self._t) - self.used)


def _need(hf: dict, key: str, where: str):
  if key not in hf or hf[key] is None:
    raise ConfigError(f"{where}: config.json has no {key!r}")
  return hf[key]


# ----------------------------------------------------------------------------- GPT-2


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


# ----------------------------------------------------------------------------- Mixtral


def _rope_theta(hf: dict) -> float:
  rp = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  if isinstance(rp, dict) and rp.get("rope_type", "default") not in ("default", None):
    raise ConfigError(f"Mixtral rope_type={rp.get('rope_type')!r} is not supported (only "
                      "'default' rotary embeddings)")
  return float(rp.get("rope_theta", hf.get("rope_theta", 1e6)) if isinstance(rp, dict)
               else hf.get("rope_theta", 1e6))


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
               rope_theta=_rope_theta(hf), mlp_activation="swiglu", attention_bias=False,
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
  """Our params -> (HF config.json dict, {name: float32 array}). `block(i)` gives block i's
  params (unscanned), `top` the non-block params. Raises ConfigError for what Mixtral lacks."""
  where = "--to_hf (Mixtral)"
  if moe is None or not moe.get("enabled", True):
    raise ConfigError(f"{where}: the model is dense; export supports MoE models only "
                      f"(supported: {', '.join(f'{k}: {v}' for k, v in SUPPORTED.items())})")
  checks = [("model.norm", model["norm"], "rms"), ("model.positions", model["positions"], "rope"),
            ("model.attention_bias", model["attention_bias"], False),
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
  out = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in out.items()}
  config = {
      "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": V,
      "hidden_size": D, "intermediate_size": F, "num_hidden_layers": L,
      "num_attention_heads": H, "num_key_value_heads": N, "head_dim": Dh, "hidden_act": "silu",
      "max_position_embeddings": model["max_len"], "rms_norm_eps": model["norm_eps"],
      "rope_theta": model["rope_theta"],
      "rope_parameters": {"rope_theta": model["rope_theta"], "rope_type": "default"},
      "sliding_window": model.get("sliding_window"), "num_local_experts": E,
      "num_experts_per_tok": K, "tie_word_embeddings": bool(model["tie_embeddings"]),
      "router_aux_loss_coef": float(moe.get("load_balance_weight", 1e-2)),
      "router_jitter_noise": 0.0, "output_router_logits": False, "attention_dropout": 0.0,
      "initializer_range": 0.02, "use_cache": True, "dtype": "float32",
  }
  return config, out


IMPORTERS = {"gpt2": gpt2_to_params, "mixtral": mixtral_to_params}

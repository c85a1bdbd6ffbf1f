"""Linen MoE modules: the router, the routed experts, shared experts and the MoE layer.

`MoeLayer(config, dtype, causal)(x_BLD, padding_mask=mask_BL, train=bool) -> y_BLD`:

1. Validates `config` (`moe.layer.config.validate_moe`, at trace time, before compilation) and the
   input shapes (one-line ValueError).
2. Flattens the B*L tokens and cuts them into G groups of T tokens. `group_size=None` means one
   group holding the whole batch; a group size larger than B*L is clamped to B*L. When B*L is
   not a multiple of the group size, the last group is filled up with padding tokens (zeros,
   masked out): they are never routed, never counted in losses or metrics, and cut off again
   from the output. Capacity is computed per group from T (padding slots included).
3. Routes in float32 (`Router`; `router_dtype="bfloat16_full"` routes in bfloat16, see
   `Router`): token choice top-K (`moe.layer.routing.top_k_routing`, with
   softmax or sigmoid scores, optional group-limited selection and routed scale: `score_func`,
   `num_groups`, `groups_selected`, `group_score`, `routed_scale`) or expert choice
   (`moe.layer.routing.expert_choice_routing`, with C = the same per-expert buffer a
   token-choice layer of this config would get, so both spend the same expert FLOPs), with the
   train or eval capacity factor.
4. Runs the routed experts through `moe.layer.dispatch.apply_experts` with the configured strategy,
   adds the shared experts (always on; `num_shared_experts` experts of width
   `shared_expert_hidden or expert_hidden`, params `shared/{w_in,w_gate,w_out}`; with
   `shared_expert_gate` their sum is multiplied per token by sigmoid(x @ `shared/gate` [D, 1]),
   as Qwen2-MoE), and returns y in `dtype`.
5. Sows two dicts into `intermediates` (`moe.layer.sown`, which also reads them back per
   layer): `moe` (aux_loss, load_balance_loss, z_loss, load, max_over_mean_load,
   dropped_fraction, tokens_dropped_fraction, router_entropy, top1_prob, mean_k, mean_kept_k,
   k_hist, active_expert_flops_per_token, top_p, bias_norm) and `routing` (expert_index,
   combine_weights, slot, selected [G, T, K]). Flax's `sow` appends, so each
   leaf is a 1-tuple holding the dict; nothing is collected unless `intermediates` is mutable.
6. With `bias_balancing`, owns `moe_bias/bias` [E] f32 (zeros at init). When `train=True`, the
   collection is mutable and the module is not initializing, it writes
   `b + bias_rate * sign(mean(load) - load)` computed from this batch's load; the bias used for
   this batch's selection is the value before the update.
7. Adaptive k (`k_rule`, docs/semantics.md "Adaptive k"): "top_p" routes with the threshold
   `top_p`; "top_p_target" owns `moe_bias/top_p` (a float32 scalar, `top_p` at init), routes
   with it and, under the same conditions as the bias, writes
   `clip(p + top_p_rate * sign(target_k - mean_k), 0, 1)`. Capacity uses `planned_k`.
   `router_entropy_weight` adds the router-entropy loss to aux_loss.

Expert weights are SwiGLU `(silu(x W_gate) * x W_in) W_out` or GELU `gelu(x W_in) W_out`; the
FFN itself is `moe.layer.dispatch.expert_ffn`, used by routed and shared experts, and its
activation (including which GELU) `moe.layer.activation.activate`, which the dense MLP uses too.

On a device mesh (`jax.set_mesh` with the axes of `moe.sharding`, more than one device) the
routing and the routed experts run expert-parallel through `moe.layer.expert_parallel`: each device
routes its own tokens (groups never cross devices; `group_size=None` then means one group per
device) and the experts are split over the `expert` axis with an all-to-all each way. Losses,
metrics and the bias update are still computed over the whole batch. Without such a mesh
nothing changes.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe.layer import dispatch
from moe.layer import expert_parallel
from moe.layer import routing as routing_lib
from moe.layer import sown
from moe.layer.config import MoeConfig, planned_k, validate_moe


def _init(in_axis: int, batch_axis: tuple[int, ...] = ()):
  """Lecun-normal (truncated) over the fan-in axis."""
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis,
                                          out_axis=-1, batch_axis=batch_axis)


def _param(module: nn.Module, name: str, init, names: tuple[str, ...], shape: tuple[int, ...]):
  """A float32 parameter with logical axis names; a shape mismatch is a one-line ValueError."""
  if module.has_variable("params", name):
    have = module.get_variable("params", name)
    have = have.value if isinstance(have, nn.meta.AxisMetadata) else have
    if tuple(jnp.shape(have)) != tuple(shape):
      raise ValueError(f"{'/'.join(module.path or ())}/{name}: parameter shape {jnp.shape(have)} "
                       f"does not match the input and config, which need {tuple(shape)} "
                       f"(check that x's last dim equals the model width D)")
  return module.param(name, nn.with_logical_partitioning(init, names), shape, jnp.float32)


def router_dtypes(router_dtype: str) -> tuple[jnp.dtype, jnp.dtype]:
  """`moe.router_dtype` -> (dtype of the router matmul, dtype the routing computes in).

  "float32": (float32, float32), whatever the model dtype (Switch's selective precision);
  "bfloat16": (bfloat16, float32), the matmul only (the meaning this value always had);
  "bfloat16_full": (bfloat16, bfloat16), logits, scores, probs and combine weights in bfloat16.
  """
  if router_dtype == "bfloat16_full":
    return jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.bfloat16)
  return jnp.dtype(router_dtype), jnp.dtype(jnp.float32)


class Router(nn.Module):
  """logits[G, T, E] = (x[G, T, D] @ W_r[D, E]) * logit_scale, returned in the routing dtype.

  `router_dtype` (`router_dtypes`): "float32" (default, whatever the model dtype) computes and
  returns float32; "bfloat16" rounds input and kernel to bfloat16 and multiplies in bfloat16,
  then returns float32 logits; "bfloat16_full" does the same and returns bfloat16 logits (the
  routing then stays in bfloat16). `logit_scale` (a stress knob, 1.0 = off) multiplies the
  logits in that dtype. `init_scale` multiplies the variance of the kernel's truncated-normal
  fan-in init (Switch's initialisation scale s; 1.0 = the default). During training with
  `jitter_eps > 0`, the router's own copy of x is multiplied by U(1-eps, 1+eps) noise from the
  rng stream 'jitter'; the experts never see that noise.
  """

  num_experts: int
  router_dtype: str = "float32"
  jitter_eps: float = 0.0
  logit_scale: float = 1.0
  init_scale: float = 1.0

  @nn.compact
  def __call__(self, x_GTD, *, train: bool):
    d = x_GTD.shape[-1]
    init = (_init(0) if self.init_scale == 1.0 else
            nn.initializers.variance_scaling(float(self.init_scale), "fan_in",
                                             "truncated_normal", in_axis=0, out_axis=-1))
    kernel_DE = _param(self, "kernel", init, ("embed", "router_expert"), (d, self.num_experts))
    dtype, out_dtype = router_dtypes(self.router_dtype)
    x = x_GTD.astype(jnp.float32)
    if train and self.jitter_eps > 0:
      x = x * jax.random.uniform(self.make_rng("jitter"), x.shape, jnp.float32,
                                 1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
    logits_GTE = jnp.einsum("GTD,DE->GTE", x.astype(dtype), kernel_DE.astype(dtype),
                            preferred_element_type=dtype).astype(out_dtype)
    if self.logit_scale != 1.0:
      logits_GTE = logits_GTE * jnp.asarray(self.logit_scale, out_dtype)
    return logits_GTE


class Experts(nn.Module):
  """E routed expert MLPs of width F: w_in/w_gate [E, D, F], w_out [E, F, D] (float32 params).

  Applies them through `moe.layer.dispatch.apply_experts` with the given routing and strategy.
  """

  num_experts: int
  hidden: int
  expert_mlp: str = "swiglu"
  strategy: str = "auto"
  dtype: jnp.dtype = jnp.float32
  planned_k: float | None = None  # mean choices per token (an adaptive k's target); None: K

  @nn.compact
  def __call__(self, x_GTD, routing: routing_lib.Routing):
    e, f, d = self.num_experts, self.hidden, x_GTD.shape[-1]
    init = _init(1, (0,))
    w_in = _param(self, "w_in", init, ("expert", "embed", "mlp"), (e, d, f))
    w_gate = None
    if self.expert_mlp == "swiglu":
      w_gate = _param(self, "w_gate", init, ("expert", "embed", "mlp"), (e, d, f))
    w_out = _param(self, "w_out", init, ("expert", "mlp", "embed"), (e, f, d))
    cast = lambda w: None if w is None else w.astype(self.dtype)
    ep = expert_parallel.context(rows=x_GTD.shape[0])
    apply = dispatch.apply_experts if ep is None else ep.apply_experts
    y_GTD = apply(x_GTD.astype(self.dtype), routing, cast(w_in), cast(w_gate), cast(w_out),
                  activation=self.expert_mlp, strategy=self.strategy, planned_k=self.planned_k)
    return y_GTD.astype(self.dtype)


class SharedExperts(nn.Module):
  """`num` always-on experts of width `hidden` each, stored as one dense MLP of width num*hidden
  (the sum of the experts' outputs equals one MLP over their concatenated hidden units):
  w_in/w_gate [D, S*F] ('embed', 'mlp'), w_out [S*F, D] ('mlp', 'embed'). With `gated`
  (Qwen2-MoE's shared_expert_gate) the output is multiplied per token by sigmoid(x @ gate),
  gate [D, 1] ('embed', None) at `shared/gate`."""

  num: int
  hidden: int
  expert_mlp: str = "swiglu"
  dtype: jnp.dtype = jnp.float32
  gated: bool = False

  @nn.compact
  def __call__(self, x_NTD):
    d, sf = x_NTD.shape[-1], self.num * self.hidden
    x = x_NTD.astype(self.dtype)
    w_in = _param(self, "w_in", _init(0), ("embed", "mlp"), (d, sf))
    w_gate = None
    if self.expert_mlp == "swiglu":
      w_gate = _param(self, "w_gate", _init(0), ("embed", "mlp"), (d, sf)).astype(self.dtype)
    w_out = _param(self, "w_out", _init(0), ("mlp", "embed"), (sf, d))
    # The routed experts' own FFN (moe.layer.dispatch): shared and routed experts cannot disagree.
    y = dispatch.expert_ffn(x, w_in.astype(self.dtype), w_gate, w_out.astype(self.dtype),
                            self.expert_mlp)
    if self.gated:
      gate_D1 = _param(self, "gate", _init(0), ("embed", None), (d, 1)).astype(self.dtype)
      y = y * jax.nn.sigmoid(x @ gate_D1)
    return y.astype(self.dtype)


def group_tokens(x_BLD, mask_BL, group_size: int | None):
  """[B, L, D] -> ([G, T, D], mask [G, T], n_real = B*L). Tail padded with masked zeros."""
  b, l, d = x_BLD.shape
  n = b * l
  t = n if group_size is None else min(int(group_size), n)
  g = -(-n // t)
  pad = g * t - n
  x_ND = x_BLD.reshape(n, d)
  mask_N = mask_BL.reshape(n)
  if pad:
    x_ND = jnp.concatenate([x_ND, jnp.zeros((pad, d), x_ND.dtype)])
    mask_N = jnp.concatenate([mask_N, jnp.zeros((pad,), bool)])
  return x_ND.reshape(g, t, d), mask_N.reshape(g, t), n


def expert_flops(cfg: MoeConfig, d_model: int) -> int:
  """Forward FLOPs of one routed assignment (one token through one expert MLP): 2*3*D*F for
  SwiGLU (three [D, F] matmuls), 2*2*D*F for GELU; routing, combine and shared experts are not
  counted. `active_expert_flops_per_token` = this x kept assignments per real token."""
  return (6 if cfg.expert_mlp == "swiglu" else 4) * d_model * cfg.expert_hidden


def _threshold(cfg: MoeConfig, top_p_var):
  """The top-p threshold in use (a float32 scalar, stop-gradient), or None for fixed k."""
  if cfg.k_rule == "top_p":
    return jnp.asarray(cfg.top_p, jnp.float32)
  if top_p_var is not None:
    return jax.lax.stop_gradient(top_p_var.value)
  return None


def _token_mask(x_BLD, padding_mask):
  """[B, L] bool: the real tokens of the layer's input (all of them without a mask)."""
  if x_BLD.ndim != 3:
    raise ValueError(f"MoeLayer input must be [B, L, D], got shape {x_BLD.shape}")
  b, l, _ = x_BLD.shape
  if padding_mask is None:
    return jnp.ones((b, l), bool)
  if tuple(jnp.shape(padding_mask)) != (b, l):
    raise ValueError(f"MoeLayer padding_mask must be [B, L] = {(b, l)}, "
                     f"got {jnp.shape(padding_mask)}")
  return jnp.asarray(padding_mask).astype(bool)


class MoeLayer(nn.Module):
  """The MoE feed-forward layer (see the module docstring for the full contract)."""

  config: MoeConfig
  dtype: jnp.dtype = jnp.float32
  causal: bool = True

  @nn.compact
  def __call__(self, x_BLD, padding_mask=None, train: bool = False):
    cfg = self.config
    validate_moe(cfg, causal=self.causal)
    mask_BL = _token_mask(x_BLD, padding_mask)
    b, l, _ = x_BLD.shape
    e, k = cfg.num_experts, cfg.num_selected

    ep = expert_parallel.context(rows=b)
    group_size = cfg.group_size if ep is None else ep.routing_group_size(cfg.group_size, b, l)
    x_GTD, mask_GT, n = group_tokens(x_BLD, mask_BL, group_size)
    g, t, d = x_GTD.shape
    capacity = routing_lib.capacity_for(t, e, planned_k(cfg), cfg.capacity_factor_for(train),
                                        cfg.min_capacity)

    top_p_var = None
    if cfg.k_rule == "top_p_target":
      top_p_var = self.variable(
          "moe_bias", "top_p",
          nn.with_logical_partitioning(lambda: jnp.asarray(cfg.top_p, jnp.float32), ()))
    bias_var = None
    if cfg.bias_balancing:
      bias_var = self.variable(
          "moe_bias", "bias",
          nn.with_logical_partitioning(lambda s: jnp.zeros(s, jnp.float32), ("router_expert",)),
          (e,))

    logits_GTE = Router(e, cfg.router_dtype, cfg.jitter_eps, cfg.router_logit_scale,
                        cfg.router_init_scale, name="router")(x_GTD, train=train)
    routing_dtype = router_dtypes(cfg.router_dtype)[1]
    if cfg.router == "expert_choice" and capacity is None:
      capacity = t  # validate_moe refuses a None train factor; eval may still be None

    def route(logits_GTE, mask_GT, bias_E, top_p):
      if cfg.router == "expert_choice":
        return routing_lib.expert_choice_routing(logits_GTE, capacity=capacity,
                                                 padding_mask=mask_GT, dtype=routing_dtype)
      return routing_lib.top_k_routing(
          logits_GTE, num_selected=k, capacity=capacity, priority=cfg.priority, bias=bias_E,
          padding_mask=mask_GT, renormalize=cfg.renormalize, score_func=cfg.score_func,
          routed_scale=cfg.routed_scale, num_groups=cfg.num_groups,
          groups_selected=cfg.groups_selected, group_score=cfg.group_score,
          dtype=routing_dtype, top_p=top_p, k_min=cfg.k_min)

    bias_E = None if bias_var is None else jax.lax.stop_gradient(bias_var.value)
    top_p = _threshold(cfg, top_p_var)
    routing = (route(logits_GTE, mask_GT, bias_E, top_p) if ep is None
               else ep.route(route, logits_GTE, mask_GT, bias_E, top_p))

    # The strategy ("auto" included) is resolved, and a bad one refused, by apply_experts.
    y_GTD = Experts(e, cfg.expert_hidden, cfg.expert_mlp, cfg.dispatch, self.dtype,
                    planned_k(cfg), name="experts")(x_GTD, routing)
    y_BLD = y_GTD.reshape(g * t, d)[:n].reshape(b, l, d)
    if cfg.num_shared_experts:
      shared_hidden = cfg.shared_expert_hidden or cfg.expert_hidden
      y_BLD = y_BLD + SharedExperts(cfg.num_shared_experts, shared_hidden, cfg.expert_mlp,
                                    self.dtype, cfg.shared_expert_gate, name="shared")(x_BLD)

    self._account(routing, bias_var, top_p_var, top_p, d, train)
    self.sow("intermediates", sown.ROUTING, sown.routing_entry(routing))
    return y_BLD.astype(self.dtype)

  def _account(self, routing, bias_var, top_p_var, top_p, d: int, train: bool) -> None:
    """The losses and metrics of `routing` sown as STATS, and the training-time updates of the
    balancing bias and the adaptive-k threshold (selection used their old values)."""
    cfg = self.config
    lb = routing_lib.load_balancing_loss(routing)
    z = routing_lib.router_z_loss(routing)
    aux = cfg.load_balance_weight * lb + cfg.z_loss_weight * z
    if cfg.router_entropy_weight:  # a Python check: the default loss keeps its exact bits
      aux = aux + cfg.router_entropy_weight * routing_lib.router_entropy_loss(routing)
    stats = routing_lib.routing_metrics(routing)
    bias_norm = jnp.zeros((), jnp.float32)
    update = train and not self.is_initializing() and self.is_mutable_collection("moe_bias")
    if bias_var is not None:
      bias_norm = jnp.linalg.norm(bias_var.value)
      if update:
        bias_var.value = routing_lib.update_bias(bias_var.value, stats["load"], cfg.bias_rate)
    if top_p_var is not None and update:
      top_p_var.value = routing_lib.update_top_p(top_p_var.value, stats["mean_k"], cfg.target_k,
                                                 cfg.top_p_rate)
    self.sow("intermediates", sown.STATS, {
        "aux_loss": aux,
        "load_balance_loss": lb,
        "z_loss": z,
        **stats,
        "active_expert_flops_per_token": stats["mean_kept_k"] * expert_flops(cfg, d),
        "top_p": jnp.asarray(1.0 if top_p is None else top_p, jnp.float32),
        "bias_norm": bias_norm,
    })

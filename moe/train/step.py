"""The jitted pieces of training: optimizer, loss, one train step, one eval step.

Everything here is a pure function of (config, model) that `moe.train.trainer` jits with explicit
shardings. The training state is a plain dict, which is also what a checkpoint stores:

    {"step": int32[], "params": ..., "opt_state": ..., "moe_bias": ..., "rng": uint32[2]}

`moe_bias` is the MoE balancing-bias collection ({} when there is none); the MoE layer updates it
itself during the training forward pass and the step keeps the returned value.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from moe import trees
from moe.layer import sown

TRAINABLE = ("all", "non_moe", "moe", "router_frozen")
MOE_KEYS = ("load_balance_loss", "z_loss", "aux_loss")


# ----------------------------------------------------------------------------- optimizer


def learning_rate_schedule(tc) -> Callable[[Any], jax.Array]:
  """Linear warmup to `learning_rate` over `warmup_steps` (update 0 already gets peak/warmup),
  then cosine decay to `learning_rate * min_lr_ratio` at `steps`, flat after that:

      lr(s) = peak * (s + 1) / W                                       s < W
      lr(s) = floor + (peak - floor) * (1 + cos(pi * min(s - W, T - W) / (T - W))) / 2    s >= W

  with W = warmup_steps, T = steps (T - W at least 1) and floor = peak * min_lr_ratio; built
  from optax's linear and cosine schedules."""
  peak = float(tc.learning_rate)
  warmup = int(tc.warmup_steps)
  total = int(tc.steps)
  decay = optax.cosine_decay_schedule(peak, max(total - warmup, 1), alpha=float(tc.min_lr_ratio))
  if warmup <= 0:
    return decay
  # linear from peak/W at update 0 to peak at update W-1 (a constant peak when W = 1)
  warm = optax.linear_schedule(peak / warmup, peak, warmup - 1)
  return optax.join_schedules([warm, decay], [warmup])


def _decays(path, leaf) -> bool:
  """Weight decay applies to weight matrices, not to norm scales or biases."""
  name = trees.key_names(path)[-1] if path else ""
  if name in ("scale", "bias") or name.endswith("_bias") or re.fullmatch(r"b_\w+", name):
    return False
  return getattr(leaf, "ndim", 0) >= 2


def decay_mask(params, decay_router: bool = True):
  """Bool tree like `params`: True where AdamW's weight decay applies. `decay_router=False`
  (`train.decay_router`, a stability stress knob) also exempts every router kernel."""
  if decay_router:
    return jax.tree_util.tree_map_with_path(_decays, params)
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: _decays(path, leaf) and "router" not in trees.key_names(path), params)


def _moe_parts(params) -> tuple[Any, Any]:
  """Two bool trees like `params`: inside an MoE layer, and inside a router.

  An MoE layer is any sub-tree holding a `router` entry (the layer's params are `router/...`,
  `experts/...` and optionally `shared/...`), at any depth, scanned or not.
  """

  def walk(node, in_moe: bool, in_router: bool):
    if isinstance(node, dict):
      here = in_moe or "router" in node
      return {k: walk(v, here, in_router or (here and k == "router")) for k, v in node.items()}
    return (in_moe, in_router)

  tagged = walk(params, False, False)
  is_pair = lambda x: isinstance(x, tuple)
  return (jax.tree.map(lambda t: t[0], tagged, is_leaf=is_pair),
          jax.tree.map(lambda t: t[1], tagged, is_leaf=is_pair))


def frozen_mask(params, trainable: str):
  """Bool tree like `params`: True where `train.trainable` freezes the param."""
  if trainable not in TRAINABLE:
    raise ValueError(f"train.trainable must be one of {list(TRAINABLE)}, got {trainable!r}")
  in_moe, in_router = _moe_parts(params)
  pick = {"all": lambda m, r: False, "non_moe": lambda m, r: m,
          "moe": lambda m, r: not m, "router_frozen": lambda m, r: r}[trainable]
  return jax.tree.map(pick, in_moe, in_router)


def make_optimizer(tc, params) -> tuple[optax.GradientTransformation, Any, Callable]:
  """AdamW with warmup + cosine schedule and global-norm clipping, frozen params excluded.

  Returns (tx, frozen tree, schedule). Frozen params get no update at all (no decay either) and
  the clipping norm is taken over the trainable gradients only.
  """
  schedule = learning_rate_schedule(tc)
  parts = []
  if tc.grad_clip and tc.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(float(tc.grad_clip)))
  decay_router = bool(getattr(tc, "decay_router", True))  # a ConfigDict or any namespace
  parts.append(optax.adamw(schedule, b1=float(tc.b1), b2=float(tc.b2),
                           weight_decay=float(tc.weight_decay),
                           mask=lambda p: decay_mask(p, decay_router)))
  inner = optax.chain(*parts)
  frozen = frozen_mask(params, tc.trainable)
  if not any(jax.tree.leaves(frozen)):
    return inner, frozen, schedule
  labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
  tx = optax.multi_transform({"train": inner, "frozen": optax.set_to_zero()}, labels)
  return tx, frozen, schedule


# ----------------------------------------------------------------------------- MoE metrics


def moe_layer_stats(intermediates) -> list[tuple[str, dict]]:
  """[(layer name, {metric: array})]: the metrics every MoE layer sows, one per layer in block
  order (`moe.layer.sown.per_layer`: a scanned stack is split into its layers)."""
  return list(sown.per_layer(intermediates, sown.STATS).items())


# ----------------------------------------------------------------------------- loss


def token_nats(logits_BLV, targets_BL, mask_BL):
  """(sum of masked cross-entropy in nats, number of masked-in tokens), both float32."""
  ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV.astype(jnp.float32),
                                                          targets_BL)
  mask_BL = mask_BL.astype(jnp.float32)
  return jnp.sum(ce_BL * mask_BL), jnp.sum(mask_BL)


def _variables(params, moe_bias) -> dict:
  return {"params": params, **({"moe_bias": moe_bias} if moe_bias else {})}


def _forward(model, params, moe_bias, batch, *, train: bool, rng=None):
  rngs = {}
  if rng is not None:
    jitter, dropout = jax.random.split(rng)
    rngs = {"jitter": jitter, "dropout": dropout}
  logits, mut = model.apply(
      _variables(params, moe_bias), batch["inputs"], positions=batch["positions"],
      segment_ids=batch["segment_ids"], train=train, rngs=rngs,
      mutable=["intermediates", "moe_bias"] if train else ["intermediates"])
  return logits, moe_layer_stats(mut.get("intermediates", {})), mut.get("moe_bias", moe_bias)


def make_train_step(model, tx, frozen, schedule) -> Callable:
  """(state, batch) -> (state, metrics). Metrics are scalars plus `moe/<layer>/<key>` arrays."""

  def train_step(state, batch):
    rng = jax.random.fold_in(state["rng"], state["step"])

    def loss_fn(params):
      logits, layers, new_bias = _forward(model, params, state["moe_bias"], batch, train=True,
                                          rng=rng)
      nats, count = token_nats(logits, batch["targets"], batch["loss_mask"])
      ce = nats / jnp.maximum(count, 1.0)
      aux = sum((d["aux_loss"] for _, d in layers), jnp.zeros((), jnp.float32))
      return ce + aux, (ce, aux, layers, new_bias)

    (loss, (ce, aux, layers, new_bias)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"])
    trainable_grads = jax.tree.map(lambda g, f: jnp.zeros_like(g) if f else g, grads, frozen)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # Frozen params keep their exact bits (x + 0.0 would turn -0.0 into +0.0).
    params = jax.tree.map(lambda new, old, f: old if f else new, params, state["params"], frozen)
    metrics = {"loss": loss, "cross_entropy": ce, "aux_loss": aux,
               "grad_norm": optax.global_norm(trainable_grads),
               "learning_rate": schedule(state["step"])}
    for name, d in layers:
      for k, v in d.items():
        metrics[f"moe/{name}/{k}"] = v
    new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state,
                     moe_bias=new_bias)
    return new_state, metrics

  return train_step


# Per-layer stats an evaluation reports as their mean over the MoE layers, `eval_moe/<key>`.
EVAL_LAYER_MEANS = ("dropped_fraction", "tokens_dropped_fraction", "mean_k",
                    "active_expert_flops_per_token")


def make_eval_step(model, layer_keys: tuple[str, ...] = ()) -> Callable:
  """(params, moe_bias, batch) -> sums over the batch (added up across batches by the caller).

  `layer_keys`: per-layer stats (e.g. "load") also returned as `layer/<name>/<key>`."""

  def eval_step(params, moe_bias, batch):
    logits, layers, _ = _forward(model, params, moe_bias, batch, train=False)
    nats, count = token_nats(logits, batch["targets"], batch["loss_mask"])
    out = {"nats": nats, "tokens": count,
           "bytes": jnp.sum(batch["target_bytes"].astype(jnp.float32)),
           "aux_loss": sum((d["aux_loss"] for _, d in layers), jnp.zeros((), jnp.float32)),
           "batches": jnp.ones((), jnp.float32)}
    for key in EVAL_LAYER_MEANS:
      vals = [d[key] for _, d in layers if key in d]
      if vals:
        out[key] = sum(vals) / len(vals)
    for name, d in layers:
      for key in layer_keys:
        if key in d:
          out[f"layer/{name}/{key}"] = d[key]
    return out

  return eval_step


def eval_metrics(sums: dict) -> dict:
  """Summed eval-step outputs -> eval_loss, eval_cross_entropy, eval_bits_per_byte, ..."""
  ce = sums["nats"] / max(sums["tokens"], 1.0)
  out = {"eval_cross_entropy": ce,
         "eval_loss": ce + sums["aux_loss"] / max(sums["batches"], 1.0),
         "eval_bits_per_byte": (sums["nats"] / math.log(2) / sums["bytes"]
                                if sums["bytes"] > 0 else float("nan")),
         "eval_tokens": sums["tokens"]}
  for key in EVAL_LAYER_MEANS:
    if key in sums:
      out[f"eval_moe/{key}"] = sums[key] / max(sums["batches"], 1.0)
  return out

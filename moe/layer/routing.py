"""Routing as pure functions (no Flax): which tokens go to which experts, in which slot.

Letters as in docs/semantics.md: G groups, T tokens per group, E experts, K choices, C capacity.

Every router takes logits of shape [G, T, E] or [T, E]. A 2-D input is routed as one group and
the returned `Routing` arrays keep the input's rank (no G axis: [T, K], [T, E], [T]). Capacity
and K are static Python ints, so everything here is jit-able and costs O(G*T*K*log(T*K)) time
and O(G*T*(K+E)) memory (a stable sort per group, never a [T, T] matrix).

The losses and metrics at the bottom take a `Routing` of either rank and pool every real
(non-padding) token of every group: f_e, P_e and the means run over all real tokens at once.

Precision: the routers compute logits, scores (softmax / sigmoid), `probs` and combine weights in
`dtype`, float32 by default (any input is cast to it). `dtype=jnp.bfloat16` is the low-precision
router ablation (`moe.router_dtype="bfloat16_full"`): every one of those arrays is bfloat16, and
each op on them rounds to bfloat16. The losses and metrics read them in float32.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

from moe.layer import rows

TOKEN_CHOICE = "token_choice"
EXPERT_CHOICE = "expert_choice"


@flax.struct.dataclass
class Routing:
  """The result of routing one batch of groups. Arrays carry an optional leading group axis G.

  expert_index[G, T, K] int32: the k-th expert chosen by token t (choice order: k=0 is the best).
      Always a valid expert id in [0, E), also for dropped assignments and padding tokens (so a
      gather never goes out of bounds); what marks those is `slot == -1` / zero weight.
  combine_weights[G, T, K] float32 (or the router's `dtype`): weight of that assignment in the output; exactly 0 where the
      assignment was dropped or the token is padding.
  slot[G, T, K] int32: the assignment's position in its expert's buffer, in [0, C) with capacity,
      in [0, T*K) dropless; -1 where dropped or padding.
  probs[G, T, E] float32 (or the router's `dtype`): softmax of the router logits (before any balancing bias); with sigmoid
      scores (`top_k_routing(score_func="sigmoid")`) sigmoid(logits) normalised to sum 1 per
      token. Feeds the balancing loss (P_e), router_entropy, top1_prob and BPR priority.
  logits[G, T, E] float32 (or the router's `dtype`): router logits.
  token_mask[G, T] bool: True for real (non-padding) tokens.
  selected[G, T, K] bool, or None: with an adaptive k (`top_k_routing(top_p=...)`) the
      assignments the router made (a prefix of each real token's K slots, before any capacity
      drop); the slots past a token's k have slot -1 and weight 0 and are not choices at all:
      not in the load, f_e or dropped_fraction (see `selected_mask`). None: every slot of every
      real token is a choice (fixed k, expert choice).
  capacity: C (static int), or None when dropless.
  kind: "token_choice", or "expert_choice" (then K = E, expert_index[..., t, e] = e, and an
      assignment is "selected" only where the expert took the token; see `selected_mask`).
  """

  expert_index: jax.Array
  combine_weights: jax.Array
  slot: jax.Array
  probs: jax.Array
  logits: jax.Array
  token_mask: jax.Array
  selected: jax.Array | None = None
  capacity: int | None = flax.struct.field(pytree_node=False, default=None)
  kind: str = flax.struct.field(pytree_node=False, default=TOKEN_CHOICE)


# ----------------------------------------------------------------------------------------------
# Capacity


def capacity_for(num_tokens: int, num_experts: int, num_selected: int,
                 capacity_factor: float | None, min_capacity: int = 0) -> int | None:
  """C = max(min_capacity, ceil(capacity_factor * K * T / E)), clamped to T; None = dropless.

  `capacity_factor` None or <= 0 means dropless here (docs/semantics.md, "Capacity"); the
  config accepts only None for dropless. The clamp: in token choice a token picks K *distinct*
  experts, so one expert never receives more than T assignments of a group and a buffer
  longer than T is pure waste (in expert choice an expert cannot take more than the T tokens
  there are). The product is rounded to 9 decimals before the ceiling so that e.g.
  1.1 * 10 / 11 gives 1, not 2.
  """
  if capacity_factor is None or capacity_factor <= 0:
    return None
  raw = round(capacity_factor * num_selected * num_tokens / num_experts, 9)
  c = max(int(min_capacity), math.ceil(raw), 1)
  return int(min(c, num_tokens)) if num_tokens > 0 else c


# ----------------------------------------------------------------------------------------------
# Token-choice top-k


def _as_groups(logits, padding_mask, dtype=jnp.float32):
  """Returns (logits[G,T,E] in `dtype`, mask[G,T] bool, squeeze: bool)."""
  logits = jnp.asarray(logits)
  if logits.ndim not in (2, 3):
    raise ValueError(f"router logits must be [T, E] or [G, T, E], got shape {logits.shape}")
  squeeze = logits.ndim == 2
  if squeeze:
    logits = logits[None]
  g, t, _ = logits.shape
  if padding_mask is None:
    mask = jnp.ones((g, t), bool)
  else:
    mask = jnp.asarray(padding_mask).astype(bool)
    if squeeze:
      mask = mask[None]
    if mask.shape != (g, t):
      raise ValueError(f"padding_mask shape {jnp.shape(padding_mask)} does not match the "
                       f"router logits' token axes {(g, t) if not squeeze else (t,)}")
  return logits.astype(_router_dtype(dtype)), mask, squeeze


ROUTER_DTYPES = ("float32", "bfloat16")


def _router_dtype(dtype):
  """float32 or bfloat16 (a ValueError otherwise): the dtype routing computes in."""
  d = jnp.dtype(dtype)
  if d.name not in ROUTER_DTYPES:
    raise ValueError(f"routing dtype must be one of {list(ROUTER_DTYPES)}, got {d.name!r}")
  return d


def _maybe_squeeze(r: Routing, squeeze: bool) -> Routing:
  if not squeeze:
    return r
  return r.replace(expert_index=r.expert_index[0], combine_weights=r.combine_weights[0],
                   slot=r.slot[0], probs=r.probs[0], logits=r.logits[0],
                   token_mask=r.token_mask[0],
                   selected=None if r.selected is None else r.selected[0])


def _buffer_positions(expert_TK, valid_TK, order_T, num_experts):
  """Position of every assignment in its expert's buffer, one group.

  Assignments are ranked choice-major (all first choices, then all second choices, ...) and,
  within a choice, by `order_T` (a permutation of the tokens, highest priority first). Invalid
  assignments (padding) get a sentinel expert E so they are never counted; their position is
  meaningless and masked by the caller. A stable sort by expert id keeps the priority order
  inside each expert, so position = index in the sorted list - start of the expert's run.
  """
  t, k = expert_TK.shape
  e_KT = jnp.where(valid_TK, expert_TK, num_experts)[order_T].T  # priority order
  perm, pos_sorted, _, _ = rows.sort_by_key(e_KT.reshape(-1), num_experts)
  pos_seq = jnp.zeros((t * k,), jnp.int32).at[perm].set(pos_sorted)
  pos_TK = jnp.zeros((t, k), jnp.int32).at[order_T].set(pos_seq.reshape(k, t).T)
  return pos_TK


SCORE_FUNCS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")


def _group_mask(select_GTE, num_groups: int, groups_selected: int, group_score: str):
  """[G, T, E] bool: the experts in each token's `groups_selected` best expert groups.

  The E experts form `num_groups` contiguous groups of E/num_groups; a group's score is the max
  ("max", DeepSeek-V2 group_limited_greedy) or the sum of the two largest ("top2_sum",
  DeepSeek-V3) selection scores in it. Ties go to the lower group index.
  """
  g, t, e = select_GTE.shape
  per_group = select_GTE.reshape(g, t, num_groups, e // num_groups)
  if group_score == "max":
    group_GTN = per_group.max(-1)
  else:
    group_GTN = jax.lax.top_k(per_group, 2)[0].sum(-1)
  _, best_GTS = jax.lax.top_k(group_GTN, groups_selected)
  keep_GTN = jnp.zeros(group_GTN.shape, bool).at[
      jnp.arange(g)[:, None, None], jnp.arange(t)[None, :, None], best_GTS].set(True)
  return jnp.repeat(keep_GTN, e // num_groups, axis=-1)


def adaptive_choices(probs_GTE, expert_GTK, top_p, k_min: int):
  """[G, T, K] bool: the slots a token takes under the top-p rule (docs/semantics.md, "Adaptive k").

  Slot j (choice order) is taken iff the probs of the experts in slots 0..j-1 sum to < top_p,
  or j < k_min, or top_p >= 1: so k = the smallest k whose first k probs sum to >= top_p,
  clamped to [k_min, K], and top_p = 1 takes all K whatever the float rounding. The sum runs
  in float32 over `probs` (softmax, or sigmoid scores normalised to sum 1) in the selection
  order, which a balancing bias may have changed (the bias orders, the probs count). Being a
  running sum of non-negative terms it never decreases, so the taken slots are a prefix.
  `top_p` may be traced (the controller moves it).
  """
  p_GTK = jnp.take_along_axis(probs_GTE.astype(jnp.float32), expert_GTK, axis=-1)
  cum_GTK = jnp.cumsum(p_GTK, axis=-1)
  before_GTK = jnp.concatenate([jnp.zeros_like(cum_GTK[..., :1]), cum_GTK[..., :-1]], axis=-1)
  top_p = jnp.asarray(top_p, jnp.float32)
  first_GTK = jnp.arange(expert_GTK.shape[-1]) < k_min
  return (before_GTK < top_p) | first_GTK | (top_p >= 1.0)


def _select(logits_GTE, num_selected, bias, score_func, num_groups, groups_selected,
            group_score, renormalize, routed_scale, top_p=None, k_min=1):
  """(expert [G,T,K] int32, gate [G,T,K], probs [G,T,E], chosen [G,T,K] bool or None): choices,
  combine weights (before capacity), `Routing.probs` (see `top_k_routing`), in the logits'
  dtype, and with `top_p` the slots taken (`adaptive_choices`; gates elsewhere are 0)."""
  tiny = jnp.finfo(logits_GTE.dtype).tiny
  if score_func == "sigmoid":
    scores_GTE = jax.nn.sigmoid(logits_GTE)
    probs_GTE = scores_GTE / jnp.maximum(scores_GTE.sum(-1, keepdims=True), tiny)
  else:
    scores_GTE = probs_GTE = jax.nn.softmax(logits_GTE, axis=-1)
  select_GTE = scores_GTE if bias is None else scores_GTE + jnp.asarray(bias, jnp.float32)
  if num_groups > 1:
    select_GTE = jnp.where(_group_mask(select_GTE, num_groups, groups_selected, group_score),
                           select_GTE, -jnp.inf)
  _, expert_GTK = jax.lax.top_k(select_GTE, num_selected)
  expert_GTK = expert_GTK.astype(jnp.int32)
  gate_GTK = jnp.take_along_axis(scores_GTE, expert_GTK, axis=-1)
  chosen_GTK = None
  if top_p is not None:
    chosen_GTK = adaptive_choices(probs_GTE, expert_GTK, top_p, k_min)
    gate_GTK = jnp.where(chosen_GTK, gate_GTK, jnp.zeros((), gate_GTK.dtype))
  if renormalize and score_func == "sigmoid":  # DeepSeek-V3: s_k / (sum of the K s + 1e-20)
    gate_GTK = gate_GTK / (gate_GTK.sum(-1, keepdims=True) + 1e-20)
  elif renormalize:
    gate_GTK = gate_GTK / jnp.maximum(gate_GTK.sum(-1, keepdims=True), tiny)
  if routed_scale != 1.0:
    gate_GTK = gate_GTK * jnp.asarray(routed_scale, gate_GTK.dtype)
  return expert_GTK, gate_GTK, probs_GTE, chosen_GTK


def _check_top_k_args(e, num_selected, priority, capacity, score_func, num_groups,
                      groups_selected, group_score, k_min=1):
  if not isinstance(num_selected, int) or not 1 <= num_selected <= e:
    raise ValueError(f"num_selected must be an int in [1, E={e}], got {num_selected!r}")
  if not isinstance(k_min, int) or not 1 <= k_min <= num_selected:
    raise ValueError(f"k_min must be an int in [1, K={num_selected}], got {k_min!r}")
  if priority not in ("choice_major", "bpr"):
    raise ValueError(f"priority must be one of ['choice_major', 'bpr'], got {priority!r}")
  if capacity is not None and (not isinstance(capacity, int) or capacity < 0):
    raise ValueError(f"capacity must be a static int >= 0 or None, got {capacity!r}")
  if score_func not in SCORE_FUNCS:
    raise ValueError(f"score_func must be one of {list(SCORE_FUNCS)}, got {score_func!r}")
  if group_score not in GROUP_SCORES:
    raise ValueError(f"group_score must be one of {list(GROUP_SCORES)}, got {group_score!r}")
  if not isinstance(num_groups, int) or num_groups < 1 or e % num_groups:
    raise ValueError(f"num_groups must be an int >= 1 dividing E={e}, got {num_groups!r}")
  if num_groups > 1 and not (
      isinstance(groups_selected, int) and 1 <= groups_selected <= num_groups
      and num_selected <= groups_selected * (e // num_groups)
      and (group_score == "max" or e // num_groups >= 2)):
    raise ValueError(f"groups_selected={groups_selected!r} with num_groups={num_groups}, E={e}, "
                     f"K={num_selected}, group_score={group_score!r} leaves fewer than K experts")


def top_k_routing(logits, *, num_selected: int, capacity: int | None,
                  priority: str = "choice_major", bias=None, padding_mask=None,
                  renormalize: bool = True, score_func: str = "softmax",
                  routed_scale: float = 1.0, num_groups: int = 1, groups_selected: int = 1,
                  group_score: str = "max", dtype=jnp.float32, top_p=None,
                  k_min: int = 1) -> Routing:
  """Token-choice top-K routing with an optional per-expert capacity.

  logits [G, T, E] or [T, E] (a 2-D input returns 2-D arrays). Per-expert scores s are
  softmax(logits) or, with `score_func="sigmoid"` (DeepSeek-V3), sigmoid(logits). `bias` [E] is
  added to s for selection only (with sigmoid this is DeepSeek-V3's e_score_correction_bias).
  With `num_groups > 1` a token first keeps its `groups_selected` best expert groups (see
  `_group_mask`; group scores use the biased s) and then takes its top-K among their experts.
  Combine weights are the unbiased s of the chosen experts, divided by their sum over the K
  choices when `renormalize` (before dropping: a dropped choice does not reweight the
  survivors; sigmoid divides by sum + 1e-20 like DeepSeek-V3), then multiplied by
  `routed_scale`. `Routing.probs` holds softmax(logits), or with sigmoid s / sum_e s (a
  distribution per token, for the balancing loss and metrics). `capacity` None = dropless. On
  overflow an expert keeps assignments in priority order: choice-major, then token order
  ("choice_major") or tokens by descending top-1 prob, ties by token order ("bpr"). Padding
  tokens (`padding_mask` False) are never routed and never take a buffer slot. `dtype`
  (float32 or bfloat16): what the logits, scores, probs and combine weights are computed and
  returned in (module docstring, "Precision").

  Adaptive k (`top_p` not None, a float or traced scalar; docs/semantics.md "Adaptive k"): K
  is k_max, and each real token takes the prefix of its K choices that `adaptive_choices`
  picks (k in [k_min, K]); `renormalize` then divides by the sum over those only. The other
  slots are not selected: slot -1, weight 0, False in `Routing.selected`; they take no buffer
  position and never push a choice out. `top_p=None` is fixed top-K (`selected` None).
  """
  logits_GTE, mask_GT, squeeze = _as_groups(logits, padding_mask, dtype)
  e = logits_GTE.shape[-1]
  _check_top_k_args(e, num_selected, priority, capacity, score_func, num_groups,
                    groups_selected, group_score, k_min)
  expert_GTK, gate_GTK, probs_GTE, chosen_GTK = _select(
      logits_GTE, num_selected, bias, score_func, num_groups, groups_selected, group_score,
      renormalize, routed_scale, top_p, k_min)

  valid_GTK = jnp.broadcast_to(mask_GT[..., None], expert_GTK.shape)
  if chosen_GTK is not None:
    valid_GTK = valid_GTK & chosen_GTK
  t = logits_GTE.shape[1]
  if priority == "bpr":
    order_GT = jnp.argsort(-probs_GTE.max(-1), axis=-1, stable=True).astype(jnp.int32)
  else:
    order_GT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), mask_GT.shape)
  pos_GTK = jax.vmap(_buffer_positions, in_axes=(0, 0, 0, None))(
      expert_GTK, valid_GTK, order_GT, e)
  kept_GTK = valid_GTK if capacity is None else valid_GTK & (pos_GTK < capacity)
  routing = Routing(
      expert_index=expert_GTK,
      combine_weights=jnp.where(kept_GTK, gate_GTK, 0.0).astype(logits_GTE.dtype),
      slot=jnp.where(kept_GTK, pos_GTK, -1).astype(jnp.int32),
      probs=probs_GTE, logits=logits_GTE, token_mask=mask_GT,
      selected=None if chosen_GTK is None else valid_GTK, capacity=capacity, kind=TOKEN_CHOICE)
  return _maybe_squeeze(routing, squeeze)


# ----------------------------------------------------------------------------------------------
# Expert choice


def expert_choice_routing(logits, *, capacity: int, padding_mask=None,
                          dtype=jnp.float32) -> Routing:
  """Each expert takes the C real tokens of its group with the largest probs[:, e].

  Expressed as a Routing with K = E so that every dispatch strategy works unchanged:
  expert_index[..., t, e] = e, combine weight = probs[t, e] where expert e took token t, else
  0; slot = the token's rank within the expert's top-C (0 = highest prob), else -1. Ties go to
  the earlier token. C is clamped to T (an expert cannot take more tokens than there are); the
  returned `capacity` is the clamped value. With padding, an expert may end up with fewer than
  C real tokens: padding is never taken. `dtype` as in `top_k_routing`.
  """
  logits_GTE, mask_GT, squeeze = _as_groups(logits, padding_mask, dtype)
  g, t, e = logits_GTE.shape
  if not isinstance(capacity, int) or capacity < 1:
    raise ValueError(f"expert choice needs a static capacity >= 1, got {capacity!r}")
  c = min(capacity, t)
  probs_GTE = jax.nn.softmax(logits_GTE, axis=-1)

  def one_group(probs_TE, mask_T):
    scores_ET = jnp.where(mask_T[None, :], probs_TE.T, -jnp.inf)
    _, token_EC = jax.lax.top_k(scores_ET, c)
    taken_EC = mask_T[token_EC]  # padding sorts last, so real picks are ranks 0..n-1
    rank_EC = jnp.where(taken_EC, jnp.arange(c, dtype=jnp.int32)[None, :], -1)
    expert_EC = jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32)[:, None], (e, c))
    slot_TE = jnp.full((t, e), -1, jnp.int32).at[token_EC, expert_EC].max(rank_EC)
    return slot_TE

  slot_GTE = jax.vmap(one_group)(probs_GTE, mask_GT)
  routing = Routing(
      expert_index=jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32), (g, t, e)),
      combine_weights=jnp.where(slot_GTE >= 0, probs_GTE, 0.0).astype(logits_GTE.dtype),
      slot=slot_GTE, probs=probs_GTE, logits=logits_GTE, token_mask=mask_GT, capacity=c,
      kind=EXPERT_CHOICE)
  return _maybe_squeeze(routing, squeeze)


# ----------------------------------------------------------------------------------------------
# Auxiliary-loss-free balancing


def update_bias(bias, load, rate: float):
  """b_e + rate * sign(mean(load) - load_e): overloaded experts go down, underloaded up."""
  load = jnp.asarray(load, jnp.float32)
  return jnp.asarray(bias, jnp.float32) + rate * jnp.sign(load.mean() - load)


def update_top_p(top_p, mean_k, target_k: float, rate: float):
  """clip(p + rate * sign(target_k - mean_k), 0, 1): too few experts per token raise the
  threshold, too many lower it (the "top_p_target" controller; docs/semantics.md "Adaptive k").
  At 0 every token takes k_min experts, at 1 all K."""
  step = rate * jnp.sign(jnp.float32(target_k) - jnp.asarray(mean_k, jnp.float32))
  return jnp.clip(jnp.asarray(top_p, jnp.float32) + step, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Losses and metrics (pooled over all real tokens of all groups)


def selected_mask(routing: Routing):
  """[..., T, K] bool: assignments the router made, before any capacity drop, padding excluded.

  Token choice: every choice of every real token (adaptive k: the slots it took,
  `Routing.selected`). Expert choice: the (token, expert) pairs the experts took (there is no
  "before dropping" there; capacity is the selection itself).
  """
  if routing.kind == EXPERT_CHOICE:
    return (routing.slot >= 0) & routing.token_mask[..., None]
  if routing.selected is not None:  # adaptive k: the prefix each token took
    return routing.selected & routing.token_mask[..., None]
  return jnp.broadcast_to(routing.token_mask[..., None], routing.expert_index.shape)


def _num_experts(routing: Routing) -> int:
  return routing.probs.shape[-1]


def expert_load(routing: Routing):
  """[E] float32: fraction of the selected assignments (before dropping) that went to each expert."""
  e = _num_experts(routing)
  sel = selected_mask(routing).reshape(-1).astype(jnp.float32)
  counts = jnp.zeros((e,), jnp.float32).at[routing.expert_index.reshape(-1)].add(sel)
  return counts / jnp.maximum(sel.sum(), 1.0)


def _mean_over_tokens(values, token_mask):
  """Mean of values[..., T] over real tokens (0 when there are none)."""
  m = token_mask.astype(jnp.float32)
  return (values * m).sum() / jnp.maximum(m.sum(), 1.0)


def load_balancing_loss(routing: Routing):
  """L_bal = E * sum_e f_e * P_e; 1.0 at perfect balance for every K. Gradient flows via P_e."""
  e = _num_experts(routing)
  f_E = jax.lax.stop_gradient(expert_load(routing))
  m = routing.token_mask.astype(jnp.float32)[..., None]
  p_E = (routing.probs * m).reshape(-1, e).sum(0) / jnp.maximum(m.sum(), 1.0)
  return e * jnp.sum(f_E * p_E)


def router_z_loss(routing: Routing):
  """L_z = mean over real tokens of logsumexp_e(logits)^2."""
  z = jax.nn.logsumexp(routing.logits.astype(jnp.float32), axis=-1)
  return _mean_over_tokens(z * z, routing.token_mask)


def router_entropy_loss(routing: Routing):
  """Mean over real tokens of the entropy -sum_e p_e log p_e of `probs`, with its gradient: Huang
  et al.'s (2024) dynamic loss, which pushes each token toward a confident router distribution
  and so toward a small top-p k."""
  p = routing.probs.astype(jnp.float32)
  safe = jnp.where(p > 0, p, 1.0)
  entropy_T = -jnp.sum(jnp.where(p > 0, p * jnp.log(safe), 0.0), axis=-1)
  return _mean_over_tokens(entropy_T, routing.token_mask)


def k_metrics(sel, kept, token_mask) -> dict:
  """mean_k (choices per real token, before drops), mean_kept_k (kept assignments per real
  token) and k_hist [K+1] (share of real tokens with k = 0, 1, ..., K choices; k = 0 happens
  only in expert choice), from selected / kept [..., T, K] bool and token_mask [..., T]."""
  m = token_mask.astype(jnp.float32)
  n = jnp.maximum(m.sum(), 1.0)
  k_T = sel.sum(-1)
  kept_T = (kept & token_mask[..., None]).sum(-1)
  onehot = jax.nn.one_hot(k_T, sel.shape[-1] + 1, dtype=jnp.float32) * m[..., None]
  return {"mean_k": (k_T * m).sum() / n, "mean_kept_k": (kept_T * m).sum() / n,
          "k_hist": onehot.reshape(-1, sel.shape[-1] + 1).sum(0) / n}


def routing_metrics(routing: Routing) -> dict:
  """load [E], max_over_mean_load, dropped_fraction, tokens_dropped_fraction, router_entropy,
  top1_prob, mean_k, mean_kept_k, k_hist [K+1] (`k_metrics`) (all float32; stop-gradient).
  Dropped = selected but given no slot; a token counts as dropped when none of its assignments
  kept a slot (expert choice: no expert took it)."""
  r = jax.tree_util.tree_map(jax.lax.stop_gradient, routing)
  load_E = expert_load(r)
  sel = selected_mask(r)
  kept = r.slot >= 0
  n_sel = sel.sum().astype(jnp.float32)
  dropped = (sel & ~kept).sum().astype(jnp.float32) / jnp.maximum(n_sel, 1.0)
  token_dropped = ~jnp.any(kept, axis=-1)
  p = r.probs.astype(jnp.float32)
  return {
      "load": load_E,
      "max_over_mean_load": load_E.max() * load_E.shape[0],
      "dropped_fraction": dropped,
      "tokens_dropped_fraction": _mean_over_tokens(token_dropped.astype(jnp.float32),
                                                   r.token_mask),
      "router_entropy": router_entropy_loss(r),  # the loss's value (r is stop-gradient)
      "top1_prob": _mean_over_tokens(p.max(-1), r.token_mask),
      **k_metrics(sel, kept, r.token_mask),
  }

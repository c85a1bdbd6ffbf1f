"""The numbers of the routing analysis (`launch.py --mode=analyze`): pure functions on arrays.

One layer's routing of N real tokens (padding already removed) is a `LayerRouting`:
`expert_index [N, K]`, `chosen [N, K]` (the assignments the router made, before any capacity
drop: every choice in token choice, the taken (token, expert) pairs in expert choice, as
`moe.layer.routing.selected_mask`) and `kept [N, K]` (those that survived capacity, slot >= 0).
Everything but `load` reads the router's choices (`chosen`), so a capacity drop does not hide
what the router decided. Definitions (following OLMoE, Muennighoff et al. 2024, section 5):

- vocabulary specialization (`vocabulary`): `counts[v, e]` = occurrences of token id v whose
  chosen experts include e, `n[v]` = occurrences of v. The token's score is
  `max_e counts[v, e] / n[v]`: the share of its occurrences that its most-chosen expert takes
  (1.0: always the same expert; K/E: spread evenly). An expert's score is
  `sum_v counts[v, e] * (counts[v, e] / n[v]) / sum_v counts[v, e]`: over the tokens it takes,
  the mean share of each token's occurrences that come to it (1.0: every token it takes comes
  only to it; K/E is chance). Its top tokens are those it takes most often (`share` = that
  token's part of the expert's assignments, `ratio` = counts[v, e] / n[v]); its distinctive
  tokens are those of highest `ratio` among tokens seen at least `min_count` times.
- domain specialization (`domain_shares`): per expert, the share of its assignments that come
  from each domain (each row sums to 1), beside each domain's share of all tokens (the share an
  expert without preference would show).
- co-activation (`coactivation`): `M[i, j]` = share of the tokens that chose i which also chose
  j (row-normalised, OLMoE's N(E_i, E_j) / N(E_i); diagonal 0; a row of an expert never chosen
  is 0). Rows do not sum to 1: with K chosen, a row sums to K - 1 at most.
- router saturation (`saturation`): per token, |final top-k set ∩ checkpoint's top-k set| /
  |final top-k set|, averaged over the tokens (OLMoE's definition); 1.0 = the checkpoint already
  routes every token as the final one does.
- per layer (`layer_load`): `load` = share of the kept assignments per expert, `chosen_load` =
  share of the router's choices per expert, `mean_k` = choices per token (K for fixed k),
  `mean_kept_k` = kept assignments per token, `dropped_fraction` = share of the choices that
  capacity dropped.
- per token kind (`by_kind`): for each kind of source text (`moe.inference.token_kinds`:
  whitespace, keyword, identifier, ...), its share of the tokens, `mean_k` (choices per token of
  that kind) and `mean_kept_k`: with adaptive k, how many experts each kind of token takes.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class LayerRouting:
  expert_index: np.ndarray  # [N, K] int
  chosen: np.ndarray  # [N, K] bool: the router's assignments (before capacity)
  kept: np.ndarray  # [N, K] bool: those kept (slot >= 0)

  @property
  def num_tokens(self) -> int:
    return int(self.expert_index.shape[0])


def layer_routing(d: dict, token_mask_N: np.ndarray, expert_choice: bool = False) -> LayerRouting:
  """A `LayerRouting` of the real tokens from one captured layer ({expert_index,
  combine_weights, slot, selected} [N, K], `moe.inference.generate.routing_per_layer`; without
  `selected`, every slot counts as chosen in token choice and the taken ones in expert choice)."""
  mask = np.asarray(token_mask_N, bool)
  idx = np.asarray(d["expert_index"])[mask]
  kept = np.asarray(d["slot"])[mask] >= 0
  if "selected" in d:  # the layer's own record of its choices (adaptive k: a prefix of K)
    chosen = np.asarray(d["selected"], bool)[mask]
  else:
    chosen = kept.copy() if expert_choice else np.ones_like(kept)
  return LayerRouting(expert_index=idx, chosen=chosen, kept=kept & chosen)


def assignments(r: LayerRouting, num_experts: int) -> np.ndarray:
  """[N, E] bool: token n chose expert e."""
  out = np.zeros((r.num_tokens, num_experts), bool)
  rows = np.broadcast_to(np.arange(r.num_tokens)[:, None], r.expert_index.shape)
  out[rows[r.chosen], r.expert_index[r.chosen]] = True
  return out


# ----------------------------------------------------------------------------- per layer


def layer_load(r: LayerRouting, num_experts: int) -> dict:
  """load, chosen_load, mean_k, mean_kept_k, dropped_fraction (module docstring)."""
  kept = np.bincount(r.expert_index[r.kept], minlength=num_experts)
  chosen = np.bincount(r.expert_index[r.chosen], minlength=num_experts)
  n = max(r.num_tokens, 1)
  return {"load": (kept / max(kept.sum(), 1)).tolist(),
          "chosen_load": (chosen / max(chosen.sum(), 1)).tolist(),
          "mean_k": float(r.chosen.sum() / n), "mean_kept_k": float(r.kept.sum() / n),
          "dropped_fraction": float(1.0 - (r.kept & r.chosen).sum() / max(r.chosen.sum(), 1))}


def by_kind(r: LayerRouting, kind_N: np.ndarray, kinds: tuple[str, ...]) -> dict:
  """{kind: {"share", "tokens", "mean_k", "mean_kept_k"}} over the tokens of each kind
  (`kind_N` [N] indexes `kinds`; a kind without tokens has mean_k None)."""
  kind_N = np.asarray(kind_N, np.int64)
  chosen_N, kept_N = r.chosen.sum(1), r.kept.sum(1)
  out = {}
  for i, name in enumerate(kinds):
    sel = kind_N == i
    n = int(sel.sum())
    out[name] = {"tokens": n, "share": n / max(r.num_tokens, 1),
                 "mean_k": float(chosen_N[sel].mean()) if n else None,
                 "mean_kept_k": float(kept_N[sel].mean()) if n else None}
  return out


# ----------------------------------------------------------------------------- vocabulary


def token_expert_counts(r: LayerRouting, token_ids_N: np.ndarray, num_experts: int,
                        vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(counts [V, E]: occurrences of v that chose e, n [V]: occurrences of v)."""
  a_NE = assignments(r, num_experts)
  ids = np.asarray(token_ids_N, np.int64)
  counts = np.zeros((vocab_size, num_experts), np.int64)
  np.add.at(counts, ids, a_NE.astype(np.int64))
  return counts, np.bincount(ids, minlength=vocab_size)


def vocabulary(r: LayerRouting, token_ids_N: np.ndarray, num_experts: int, vocab_size: int, *,
               top: int = 10, min_count: int = 5) -> dict:
  """Vocabulary specialization (module docstring): per expert its score, top and distinctive
  tokens (ids with share / ratio), and the occurrence-weighted mean token score."""
  counts, n = token_expert_counts(r, token_ids_N, num_experts, vocab_size)
  seen = n > 0
  ratio = np.where(seen[:, None], counts / np.maximum(n, 1)[:, None], 0.0)  # [V, E]
  per_expert = counts.sum(0)
  experts = []
  for e in range(num_experts):
    c = counts[:, e]
    total = max(int(per_expert[e]), 1)
    order = [int(v) for v in np.argsort(-c, kind="stable")[:top] if c[v] > 0]
    frequent = np.flatnonzero((n >= min_count) & (c > 0))
    distinct = [int(v) for v in frequent[np.argsort(-ratio[frequent, e], kind="stable")][:top]]
    experts.append({
        "score": float((c * ratio[:, e]).sum() / total) if per_expert[e] else 0.0,
        "assignments": int(per_expert[e]),
        "top_tokens": [{"id": v, "share": float(c[v] / total), "ratio": float(ratio[v, e])}
                       for v in order],
        "distinctive_tokens": [{"id": v, "count": int(n[v]), "ratio": float(ratio[v, e])}
                               for v in distinct]})
  token_score = ratio.max(1)  # [V]
  return {"experts": experts, "expert_score": [x["score"] for x in experts],
          "token_score_mean": float((token_score * n).sum() / max(n.sum(), 1)),
          "chance": float(r.chosen.sum() / max(r.num_tokens, 1) / num_experts)}


# ----------------------------------------------------------------------------- domains


def domain_shares(r: LayerRouting, domain_N: np.ndarray, domains: list[str],
                  num_experts: int) -> dict:
  """Per expert the share of its assignments from each domain (`domain_N` [N] indexes
  `domains`), and each domain's share of the tokens."""
  a_NE = assignments(r, num_experts).astype(np.int64)
  dom = np.asarray(domain_N, np.int64)
  by_domain = np.zeros((len(domains), num_experts), np.int64)
  np.add.at(by_domain, dom, a_NE)
  per_expert = by_domain.sum(0)
  shares_ED = np.where(per_expert[:, None] > 0, by_domain.T / np.maximum(per_expert, 1)[:, None],
                       0.0)
  tokens = np.bincount(dom, minlength=len(domains))
  return {"domains": list(domains), "shares": shares_ED.tolist(),
          "token_share": (tokens / max(tokens.sum(), 1)).tolist(), "tokens": tokens.tolist()}


# ----------------------------------------------------------------------------- co-activation


def coactivation(r: LayerRouting, num_experts: int, top: int = 5) -> dict:
  """M[i, j] = P(j chosen | i chosen) (module docstring) and the `top` pairs (i, j) by M."""
  a = assignments(r, num_experts).astype(np.int64)
  both = a.T @ a  # [E, E]: tokens choosing i and j
  n_i = np.diag(both).copy()
  m = np.where(n_i[:, None] > 0, both / np.maximum(n_i, 1)[:, None], 0.0)
  np.fill_diagonal(m, 0.0)
  flat = np.argsort(-m, axis=None, kind="stable")[:top]
  pairs = [{"from": int(i), "to": int(j), "share": float(m[i, j])}
           for i, j in zip(*np.unravel_index(flat, m.shape)) if m[i, j] > 0]
  return {"matrix": m.tolist(), "top_pairs": pairs}


# ----------------------------------------------------------------------------- saturation


def saturation(final: LayerRouting, earlier: LayerRouting, num_experts: int) -> float:
  """Mean over tokens of |final set ∩ earlier set| / |final set| (tokens the final routing
  sends nowhere are left out)."""
  if final.num_tokens != earlier.num_tokens:
    raise ValueError(f"saturation: {final.num_tokens} tokens in the final routing, "
                     f"{earlier.num_tokens} in the earlier one")
  f, e = assignments(final, num_experts), assignments(earlier, num_experts)
  size = f.sum(1)
  ok = size > 0
  if not ok.any():
    return 0.0
  return float(((f & e).sum(1)[ok] / size[ok]).mean())


# ----------------------------------------------------------------------------- domains of paths


def path_domains(path: str | None) -> tuple[str, str]:
  """(kind, package) of a source file's relative path: kind "tests" when a folder is named
  test/tests or the file test_*.py / *_test.py, else "library"; package the first path
  component without `.py` (a top-level module is its own package). No path: ("text", "text")."""
  if not path:
    return "text", "text"
  parts = path.split("/")
  name = parts[-1]
  tests = (any(p in ("test", "tests") for p in parts[:-1]) or name.startswith("test_")
           or name.endswith("_test.py"))
  top = parts[0][:-3] if len(parts) == 1 and parts[0].endswith(".py") else parts[0]
  return ("tests" if tests else "library"), top


def group_labels(labels: list[str], keep: int = 12) -> tuple[list[str], np.ndarray]:
  """(names, index [N]) of per-token labels, the `keep` most frequent kept by name and the rest
  merged into "other"."""
  names, inverse, counts = np.unique(np.asarray(labels, dtype=object).astype(str),
                                     return_inverse=True, return_counts=True)
  order = np.argsort(-counts, kind="stable")
  kept = [str(names[i]) for i in order[:keep]]
  lookup = {n: i for i, n in enumerate(kept)}
  of_name = np.asarray([lookup.get(str(n), len(kept)) for n in names], np.int64)
  index = of_name[np.ravel(inverse)]
  return kept + (["other"] if len(names) > keep else []), index

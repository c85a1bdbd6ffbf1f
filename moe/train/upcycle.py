"""Sparse upcycling (Komatsuzaki et al. 2023): a dense checkpoint -> the params of an MoE model.

    params = upcycle_params(dense_params, abstract_moe_params, cfg, init_params=None)

- Every MoE block's E experts start as copies of that block's dense FFN: `mlp/w_in`, `mlp/w_gate`,
  `mlp/w_out` ([D, F], [D, F], [F, D]) -> `moe/experts/w_in`, `w_gate` [E, D, F], `w_out`
  [E, F, D] (the same names, broadcast over E). With `train.upcycle_noise = eps > 0` each expert
  copy is multiplied element-wise by (1 + eps * N(0, 1)), drawn from a fixed key
  (`train.seed` folded with a hash of the param path), so the experts can diverge.
- The router (and shared experts, if any) start fresh: taken from `init_params` (the MoE model's
  own initialization) when given, else drawn with the MoE layer's initializer (truncated
  Lecun-normal over the fan-in axis, the distribution `moe.layer.modules` uses) from a fixed key.
- Everything else (embeddings, attention, norms, dense blocks of the MoE model, output layer) is
  copied unchanged.

With renormalized top-K routing and no dropped assignments, every token's K combine weights sum to
1 and every expert computes the dense FFN, so the upcycled model computes exactly what its dense
parent computed (tests/train/test_upcycle.py checks the logits and the trainer's loss).

Works on unscanned (`block_<i>/...`) and scanned (`blocks/...`, leading layer axis) parameter
trees; dense and MoE must agree on `model.scan_layers`. Any mismatch is a one-line ConfigError
naming the param and both shapes.
"""

from __future__ import annotations

import zlib

import jax
import numpy as np

from moe import trees
from moe.layer import modules
from moe.errors import ConfigError

EXPERT_WEIGHTS = ("w_in", "w_gate", "w_out")
FRESH = ("router", "shared")  # sub-trees of an MoE layer that do not come from the dense FFN


def _name(path) -> str:
  return "/".join(path)


def _path_key(seed: int, path: tuple[str, ...]):
  return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(_name(path).encode()) & 0x7FFFFFFF)


def fresh_init(shape, key) -> np.ndarray:
  """The MoE layer's initializer (truncated Lecun-normal over the fan-in axis -2), float32.

  Leading axes (a scanned stack's layer axis) are batch axes: each [D, X] slice gets the
  variance the unscanned layer's param gets, not one shrunk by the number of layers.
  """
  lead = tuple(range(len(shape) - 2))
  return np.asarray(modules._init(len(shape) - 2, lead)(key, tuple(shape), np.float32))


def _source_of(path: tuple[str, ...]):
  """Where an MoE-model param comes from: ("copy", path) | ("expert", dense path) | ("fresh",)."""
  if "moe" not in path:
    return ("copy", path)
  j = path.index("moe")
  rest = path[j + 1:]
  if rest and rest[0] == "experts" and len(rest) == 2 and rest[1] in EXPERT_WEIGHTS:
    return ("expert", path[:j] + ("mlp", rest[1]))
  if rest and rest[0] in FRESH:
    return ("fresh",)
  raise ConfigError(f"upcycle: do not know how to initialize MoE param {_name(path)} from a "
                    f"dense checkpoint")


def upcycle_params(dense_params, abstract_moe_params, cfg, init_params=None):
  """Dense params (nested dicts of arrays) -> MoE params shaped like `abstract_moe_params`.

  `cfg` is the run's ConfigDict (reads `train.upcycle_noise`, `train.seed`, `moe.num_experts`,
  `moe.expert_hidden`). Returns host numpy float32 arrays in the abstract tree's structure; the
  caller places them on devices. Raises ConfigError (one line) when the trees do not fit.
  """
  noise = float(cfg.train.get("upcycle_noise", 0.0) or 0.0)
  if noise < 0:
    raise ConfigError(f"train.upcycle_noise must be >= 0, got {noise}")
  seed = int(cfg.train.get("seed", 0))
  dense = dict(trees.array_leaves(dense_params))  # {path tuple: leaf}
  want = dict(trees.array_leaves(abstract_moe_params))
  init = dict(trees.array_leaves(init_params)) if init_params is not None else {}
  if not any("moe" in p for p in want):
    raise ConfigError("train.upcycle=True but the model has no MoE block (set moe.enabled=True)")
  if any("moe" in p for p in dense):
    raise ConfigError("train.upcycle needs a dense checkpoint in train.init_from, but it already "
                      "holds MoE layers (use init_from without upcycle to continue an MoE model)")

  used: set[tuple[str, ...]] = set()
  out = {}
  for path, target in want.items():
    shape = tuple(target.shape)
    src = _source_of(path)
    if src[0] == "fresh":
      out[path] = _fresh_leaf(path, shape, init, seed)
      continue
    dpath = src[1]
    if dpath not in dense:
      hint = (" (the dense checkpoint has no FFN there: is it a dense model with the same "
              "num_layers and scan_layers?)" if src[0] == "expert" else "")
      raise ConfigError(f"upcycle: MoE param {_name(path)} (shape {shape}) needs dense param "
                        f"{_name(dpath)}, which is not in train.init_from{hint}")
    w = np.asarray(dense[dpath], np.float32)
    used.add(dpath)
    if src[0] == "copy":
      if tuple(w.shape) != shape:
        raise ConfigError(f"upcycle: param {_name(path)} has shape {tuple(w.shape)} in the dense "
                          f"checkpoint but {shape} in the MoE model (only the FFN may change)")
      out[path] = w
      continue
    out[path] = _expert_leaf(path, dpath, w, shape, noise, seed, cfg.moe.expert_hidden)
  _check_all_used(dense, used)
  return trees.unflatten(out)


def _fresh_leaf(path, shape, init, seed):
  """A param the dense model lacks: from `init` (the MoE model's own initialisation) if given,
  else drawn here (router [.., D, E], shared w_in/w_gate [.., D, SF], w_out [.., SF, D]: fan-in
  axis -2)."""
  out = (np.asarray(init[path], np.float32) if path in init
         else fresh_init(shape, _path_key(seed, path)))
  if tuple(out.shape) != shape:
    raise ConfigError(f"upcycle: init param {_name(path)} has shape {out.shape}, "
                      f"the model needs {shape}")
  return out


def _expert_leaf(path, dpath, w, shape, noise, seed, expert_hidden):
  """Expert weights: dense [.., D, F] / [.., F, D] copied to [.., E, D, F] / [.., E, F, D],
  each copy times (1 + noise * N(0, 1)) when noise > 0."""
  e_axis = len(shape) - 3
  expected = shape[:e_axis] + shape[e_axis + 1:]
  if len(shape) < 3 or tuple(w.shape) != expected:
    raise ConfigError(
        f"upcycle: dense param {_name(dpath)} has shape {tuple(w.shape)} but MoE param "
        f"{_name(path)} needs {expected} per expert (shape {shape}): the dense model.d_ff "
        f"must equal moe.expert_hidden (={expert_hidden}) and model.d_model must match")
  copies = np.broadcast_to(np.expand_dims(w, e_axis), shape).astype(np.float32)
  if noise > 0:
    n = np.asarray(jax.random.normal(_path_key(seed, path), shape, np.float32))
    copies = copies * (1.0 + noise * n)
  return np.ascontiguousarray(copies)


def _check_all_used(dense, used):
  """ConfigError naming the first dense param the MoE model has no place for."""
  left = sorted(p for p in dense if p not in used)
  if left:
    p = left[0]
    why = (" (the dense FFN has biases; MoE experts have none: upcycle a model with "
           "model.attention_bias=False)" if p[-1].startswith("b_") and "mlp" in p else "")
    raise ConfigError(f"upcycle: dense param {_name(p)} (shape {tuple(np.shape(dense[p]))}) has "
                      f"no place in the MoE model{why}")

"""Phase 1 of training: every user error in a config, found before anything is compiled.

Each check raises `moe.errors.ConfigError` with one line naming the field and what is allowed.
`validate_config` needs neither data nor devices; `check_divisible` needs the mesh and the abstract
params (still nothing compiled). The mesh itself is checked by `moe.sharding.validate_mesh`.
"""

from __future__ import annotations

import math
import os

import jax
from jax.sharding import NamedSharding

from moe import sharding as sharding_lib
from moe.train import checkpoint as ckpt_lib
from moe.train import step as step_lib
from moe.errors import ConfigError
from moe.model.config import model_config_from, validate_model


def _int_at_least(name: str, value, low: int) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < low:
    raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def _number_in(name: str, value, low: float, high: float, *, low_open=False, high_open=False):
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  ok = ok and (value > low if low_open else value >= low) and (
      value < high if high_open else value <= high)
  if not ok:
    lo, hi = "(" if low_open else "[", ")" if high_open else "]"
    raise ConfigError(f"{name} must be a number in {lo}{low}, {high}{hi}, got {value!r}")


def validate_config(cfg) -> None:
  """Every static check of a config (no data, no devices). Raises ConfigError (one line)."""
  for group in ("model", "moe", "train", "data", "mesh"):
    if group not in cfg:
      raise ConfigError(f"config has no `{group}` group (see configs/default.py)")
  # Vocabulary size comes from the tokenizer later; any positive stand-in checks the rest.
  validate_model(model_config_from(cfg, vocab_size=259))
  t = cfg.train
  for name, low in (("steps", 1), ("batch_size", 1), ("warmup_steps", 0), ("log_every", 1),
                    ("eval_every", 1), ("eval_batches", 0), ("checkpoint_every", 1),
                    ("keep_checkpoints", 1), ("seed", 0)):
    _int_at_least(f"train.{name}", t[name], low)
  _number_in("train.learning_rate", t.learning_rate, 0.0, math.inf, low_open=True)
  _number_in("train.min_lr_ratio", t.min_lr_ratio, 0.0, 1.0)
  _number_in("train.weight_decay", t.weight_decay, 0.0, math.inf)
  _number_in("train.b1", t.b1, 0.0, 1.0, high_open=True)
  _number_in("train.b2", t.b2, 0.0, 1.0, high_open=True)
  _number_in("train.grad_clip", t.grad_clip, 0.0, math.inf)
  if t.trainable not in step_lib.TRAINABLE:
    raise ConfigError(f"train.trainable must be one of {list(step_lib.TRAINABLE)}, "
                      f"got {t.trainable!r}")
  if t.upcycle:
    if not t.init_from:
      raise ConfigError("train.upcycle=True needs train.init_from (the dense checkpoint to "
                        "upcycle)")
    if not cfg.moe.get("enabled", True):
      raise ConfigError("train.upcycle=True needs moe.enabled=True (the MoE model to build)")
  if t.init_from:
    try:
      ckpt_lib.resolve(t.init_from)
    except ConfigError as e:
      raise ConfigError(f"train.init_from: {e}") from None
  from moe.data import pipeline as data_lib  # its own field checks (name, tokenizer, ...)
  data_lib.validate_data(cfg.data)
  seq_len, max_len = cfg.data.seq_len, cfg.model.max_len
  if seq_len > max_len:
    raise ConfigError(f"data.seq_len ({seq_len}) must be <= model.max_len ({max_len}); "
                      "positions restart per packed piece")


def check_mesh(cfg, num_devices: int, num_processes: int = 1) -> dict[str, int]:
  """`moe.sharding.validate_mesh` on `cfg.mesh` with the numbers it splits; the mesh sizes.

  Needs the model, train and data fields checked first (they are passed on as integers)."""
  m, moe = cfg.model, cfg.moe
  divisible = [("model.d_ff", m.d_ff, "tensor"), ("model.num_heads", m.num_heads, "tensor"),
               ("model.num_kv_heads", m.num_kv_heads, "tensor"),
               ("model.d_model", m.d_model, "fsdp")]
  group_size = None
  if moe.get("enabled", True):
    divisible[:0] = [("moe.num_experts", moe.num_experts, "expert"),
                     ("moe.expert_hidden", moe.expert_hidden, "tensor")]
    group_size = moe.get("group_size", None)
  return sharding_lib.validate_mesh(cfg.mesh, num_devices, num_processes,
                                    batch_size=cfg.train.batch_size, seq_len=cfg.data.seq_len,
                                    divisible=divisible, group_size=group_size)


def config_warnings(cfg) -> list[str]:
  """Legal settings that are probably not what a researcher meant: one line each, logged."""
  out = []
  m = cfg.moe
  if (m.get("enabled", True) and m.router == "token_choice" and m.num_selected == 1
      and m.renormalize):
    out.append("moe.num_selected=1 with moe.renormalize=True: every combine weight is 1, so the "
               "router learns only from the auxiliary losses; Switch-style top-1 sets "
               "moe.renormalize=False")
  return out


def check_workdir(workdir: str) -> None:
  """The workdir must be creatable and writable (a one-line error naming --workdir)."""
  if not workdir:
    raise ConfigError("--workdir is empty; give a directory for checkpoints and metrics")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} is not writable ({e.strerror or e})") from None


def check_divisible(abstract_params, shardings, mesh) -> None:
  """Each sharded param dim must divide evenly over its mesh axes."""
  flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, leaf), sharding in zip(flat, flat_shardings):
    for dim, axes in zip(leaf.shape, tuple(sharding.spec)):
      axes = (axes,) if isinstance(axes, str) else (axes or ())
      size = math.prod(mesh.shape[a] for a in axes)
      if dim % size:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        raise ConfigError(f"param {name} dim {dim} cannot be split over mesh axes {axes} "
                          f"(size {size}); change cfg.mesh or the model size")

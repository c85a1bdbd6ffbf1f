"""Phase 1 of training: every user error in a config, found before the data is built.

Each check raises `moe.errors.ConfigError` with one line naming the field and what is allowed, and
each runs once. `validate_config(cfg)` runs them all, in this order (the first error wins):

  1. groups       `model`, `moe`, `train`, `data` and `mesh` are present
  2. model        the `model` and `moe` groups (`moe.model.config.validate_model_groups`: every
                  field, the MoE layer's, and scan_layers' identical blocks)
  3. train        the `train` group's fields, `train.trainable`, `train.upcycle`'s needs
  4. data         the `data` group (`moe.data.pipeline.validate_data`), data.seq_len <= max_len
  5. init_from    `train.init_from` names a checkpoint on disk; one converted with its own
                  tokenizer (`hf_tokenizer/`) needs `data.tokenizer="hf:..."`
  6. mesh         `cfg.mesh` against this machine's devices and processes (`check_mesh`)

Steps 1-4 read only the config (`validate_fields`: a sweep checks every run with them while it
expands); 5-6 read the disk and the devices (`validate_environment`). Later phases check what needs
more: `check_workdir` the run folder, `moe.model.config.check_vocab_size` an explicit
`model.vocab_size` against the tokenizer, `check_divisible` the abstract params on the mesh.
Numbers are finite and integers bounded (`moe.errors`): train step counts by the int32 step
counter, `train.seed` by what `jax.random.PRNGKey` keeps.
"""

from __future__ import annotations

import math
import os

import jax
from etils import epath
from jax.sharding import NamedSharding

from moe import rundir
from moe import sharding as sharding_lib
from moe import trees
from moe.data.pipeline import validate_data
from moe.errors import (INT32_MAX, SEED_MAX, ConfigError, check_bool, check_choice, check_int,
                        check_number, check_str)
from moe.model.config import validate_model_groups
from moe.rundir import HF_TOKENIZER_DIR
from moe.train import checkpoint as ckpt_lib
from moe.train import divergence
from moe.train import step as step_lib
from moe.train.profiling import parse_profile_steps

GROUPS = ("model", "moe", "train", "data", "mesh")
# train fields that are integers in [low, high]: step counts fit the int32 step counter on the
# device, the seed what jax.random.PRNGKey keeps of it.
TRAIN_INTS = (("steps", 1, INT32_MAX), ("batch_size", 1, INT32_MAX),
              ("warmup_steps", 0, INT32_MAX), ("log_every", 1, INT32_MAX),
              ("eval_every", 1, INT32_MAX), ("eval_batches", 0, INT32_MAX),
              ("checkpoint_every", 1, INT32_MAX), ("keep_checkpoints", 1, INT32_MAX),
              ("seed", 0, SEED_MAX))
# train fields that are finite numbers in an interval: (name, low, high, low_open, high_open).
TRAIN_NUMBERS = (("learning_rate", 0.0, math.inf, True, False),
                 ("min_lr_ratio", 0.0, 1.0, False, False),
                 ("weight_decay", 0.0, math.inf, False, False),
                 ("b1", 0.0, 1.0, False, True), ("b2", 0.0, 1.0, False, True),
                 ("grad_clip", 0.0, math.inf, False, False),
                 ("upcycle_noise", 0.0, math.inf, False, False))


def validate_config(cfg, num_devices: int | None = None, num_processes: int | None = None) -> None:
  """Every static check of a config, once each, in the module docstring's order (the device and
  process counts default to this machine's). Raises ConfigError (one line)."""
  validate_fields(cfg)
  validate_environment(cfg, num_devices, num_processes)


def validate_fields(cfg) -> None:
  """Steps 1-4: every check that reads nothing but the config."""
  for group in GROUPS:
    if group not in cfg:
      raise ConfigError(f"config has no `{group}` group (see configs/default.py)")
  validate_model_groups(cfg)
  check_train(cfg)
  validate_data(cfg.data)
  if cfg.data.seq_len > cfg.model.max_len:
    raise ConfigError(f"data.seq_len ({cfg.data.seq_len}) must be <= model.max_len "
                      f"({cfg.model.max_len}); positions restart per packed piece")


def check_train(cfg) -> None:
  """Step 3: the `train` group (and, for train.upcycle and train.trainable, whether moe is
  enabled)."""
  t = cfg.train
  for name, low, high in TRAIN_INTS:
    check_int(f"train.{name}", t[name], low, high=high)
  for name, low, high, low_open, high_open in TRAIN_NUMBERS:
    check_number(f"train.{name}", t[name], low, high, low_open=low_open, high_open=high_open)
  check_choice("train.trainable", t.trainable, step_lib.TRAINABLE)
  check_str("train.init_from", t.init_from)
  check_bool("train.upcycle", t.upcycle)
  moe_enabled = cfg.moe.get("enabled", True)
  if t.upcycle and not t.init_from:
    raise ConfigError("train.upcycle=True needs train.init_from (the dense checkpoint to upcycle)")
  if t.upcycle and not moe_enabled:
    raise ConfigError("train.upcycle=True needs moe.enabled=True (the MoE model to build)")
  if t.trainable in ("moe", "router_frozen") and not moe_enabled:
    raise ConfigError(f"train.trainable={t.trainable!r} needs moe.enabled=True (a dense model "
                      "has no MoE parameters); use 'all' or 'non_moe'")
  check_profile_steps(t)
  check_str("train.wandb_project", t.get("wandb_project", ""))
  divergence.check_fields(t)  # spike / blow-up thresholds, train.decay_router


def check_profile_steps(t) -> None:
  """`train.profile_steps`: "" (off) or "start:end" with 0 < start < end <= train.steps."""
  spec = t.get("profile_steps", "")
  try:
    window = parse_profile_steps(spec)
  except ValueError:
    window = (0, 0)
  if window is not None and not 0 < window[0] < window[1] <= t.steps:
    raise ConfigError(f'train.profile_steps must be "start:end" with 0 < start < end <= '
                      f'train.steps ({t.steps}), or "" (off); got {spec!r}')


def validate_environment(cfg, num_devices: int | None = None,
                         num_processes: int | None = None) -> None:
  """Steps 5-6: train.init_from on disk and the mesh on the devices (after `validate_fields`)."""
  if cfg.train.init_from:
    try:
      directory, _ = ckpt_lib.resolve(cfg.train.init_from)
    except ConfigError as e:
      raise ConfigError(f"train.init_from: {e}") from None
    check_init_from_tokenizer(cfg, directory)
  check_mesh(cfg, jax.device_count() if num_devices is None else num_devices,
             jax.process_count() if num_processes is None else num_processes)


def check_init_from_tokenizer(cfg, checkpoints_dir: str) -> None:
  """An imported model's token ids are its tokenizer's: training it on another tokenizer's ids
  (the byte default) is refused in one line naming the `data.tokenizer` to set."""
  run = rundir.join(checkpoints_dir.rstrip("/").rpartition("/")[0], HF_TOKENIZER_DIR)
  spec = cfg.data.tokenizer
  if (rundir.exists(rundir.join(run, "tokenizer.json"))
      and not (isinstance(spec, str) and spec.startswith("hf:"))):
    raise ConfigError(f"data.tokenizer={spec!r}, but train.init_from={cfg.train.init_from!r} is a "
                      f"converted model with its own tokenizer: set data.tokenizer='hf:{run}' "
                      "(its config.py does)")


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


def config_warnings(cfg, num_devices: int | None = None) -> list[str]:
  """Legal settings that are probably not what a researcher meant: one line each, logged.

  `num_devices` (default: this machine's) is what the mesh is laid over: `moe.group_size=None`
  warns when it splits the batch over more than one device (the routing then depends on the mesh).
  """
  out = []
  m = cfg.moe
  if not m.get("enabled", True):
    return out
  if m.router == "token_choice" and m.num_selected == 1 and m.renormalize:
    out.append("moe.num_selected=1 with moe.renormalize=True: every combine weight is 1, so the "
               "router learns only from the auxiliary losses; Switch-style top-1 sets "
               "moe.renormalize=False")
  if m.get("group_size", None) is None:
    try:
      shards = sharding_lib.batch_shards(
          cfg.mesh, jax.device_count() if num_devices is None else num_devices)
    except ConfigError:  # an invalid mesh is validate_config's error, not a warning
      shards = 1
    if shards > 1:
      out.append(f"moe.group_size=None routes each device's tokens as one group, so with the "
                 f"batch split over {shards} devices the routing (drops, losses) depends on the "
                 f"mesh; set moe.group_size (e.g. 512) to train the same function on any mesh")
  return out


def check_workdir(workdir: str) -> None:
  """The workdir must be creatable and writable (a one-line error naming --workdir); local or
  remote (`gs://...`), through etils.epath."""
  if not workdir:
    raise ConfigError("--workdir is empty; give a directory for checkpoints and metrics")
  try:
    folder = epath.Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write_test_{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()
  except Exception as e:  # noqa: BLE001 - OSError locally; a remote backend's own errors too
    reason = (getattr(e, "strerror", None)
              or (str(e).strip().splitlines() or [type(e).__name__])[0])
    raise ConfigError(f"--workdir={workdir} is not writable ({reason})") from None


def check_divisible(abstract_params, shardings, mesh) -> None:
  """Each sharded param dim must divide evenly over its mesh axes."""
  flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, leaf), sharding in zip(flat, flat_shardings):
    for dim, axes in zip(leaf.shape, tuple(sharding.spec)):
      axes = (axes,) if isinstance(axes, str) else (axes or ())
      size = math.prod(mesh.shape[a] for a in axes)
      if dim % size:
        name = "/".join(trees.key_names(path))
        raise ConfigError(f"param {name} dim {dim} cannot be split over mesh axes {axes} "
                          f"(size {size}); change cfg.mesh or the model size")

"""Training and evaluation: `train_and_evaluate(cfg, workdir) -> summary dict`.

Phases, in order (each one a few lines below):

  1. validate     every user error, one line each (`ConfigError`), before the data is built:
                  the workdir's config.json, if any, against cfg (`moe.runconfig`),
                  `moe.train.checks.validate_config` (model/MoE, train and data fields,
                  train.init_from, the mesh against the devices, batch and widths), the workdir
  2. mesh         `moe.sharding.make_mesh(cfg.mesh)`
  3. data         `moe.data.pipeline.make_data` (tokenizer, packed rows, iterator, eval batches);
                  then an explicit `model.vocab_size` must hold the tokenizer's ids
  4. shapes       `jax.eval_shape` of the model's init: the abstract params and `moe_bias`
  5. shardings    logical axis names -> `NamedSharding`s through `moe.sharding.LOGICAL_RULES`
  6. checkpoint   resume target: the newest intact checkpoint in `workdir/checkpoints` (a
                  damaged one is set aside with a warning, `moe.train.checkpoint`), or
                  `train.init_from`, must fit the abstract state, else a one-line error naming
                  the first differing param and both shapes; then the resolved config is
                  written to `workdir/config.json` (process 0, `moe.runconfig.save`), and
                  `devices.json` records the machine (`moe.train.machine`; a resume on another
                  one warns in one line)
  7. init         params initialized by a jit with `out_shardings` (no host holds all params),
                  optimizer state likewise; then restored from the checkpoint, or loaded from
                  `train.init_from` (optionally upcycled from a dense model)
  8. step         jit of `moe.train.step.make_train_step` (AdamW, warmup + cosine, clipping,
                  cross-entropy + every MoE layer's aux_loss, moe_bias kept from the forward pass)
  9. loop         `moe.train.loop`: every `log_every` steps a metrics.jsonl record +
                  TensorBoard + a progress line; evaluation every `eval_every` and at the
                  end; a checkpoint every `checkpoint_every` and at the end (with the
                  unlogged metrics window); SIGTERM or Ctrl-C, also during phases 1-8
                  -> checkpoint and stop ("preempted"); a non-finite loss, a loss blow-up
                  or too many spikes (`moe.train.divergence`) stop the run ("diverged");
                  records carry TFLOP/s per device and MFU;
                  `train.profile_steps` traces a window of steps
 10. summary      `workdir/summary.json`: status, final eval metrics, tokens/s, TFLOP/s per
                  device and MFU, wall time, steps; `workdir/load.png` (expert load per layer)

The console gets one line per start-up phase (data, model size and FLOPs, compile time) and one
progress line per logged step.

The whole run holds the workdir's lock (`moe.train.lock`) and the SIGTERM/SIGINT handlers
(`moe.train.preemption`); XLA's out-of-memory error becomes one line naming the sizes.

Only process 0 writes metrics.jsonl, summary.json and TensorBoard files; every process writes
its own shards of each checkpoint.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import NamedSharding

from moe import rundir
from moe import runconfig
from moe import sharding as sharding_lib
from moe import trees
from moe.data import pipeline as data_lib
from moe.errors import ConfigError
from moe.model.config import check_vocab_size, model_config_from
from moe.model.flops import flops_per_token
from moe.model.transformer import Transformer, active_params, count_params
from moe.rundir import CHECKPOINTS_DIR, SUMMARY_FILE, write_json_atomic
from moe.sharding import LOGICAL_RULES, logical_sharding, make_mesh
from moe.train import checkpoint as ckpt_lib
from moe.train import load_plot
from moe.train.loop import BATCH_KEYS, Loop, global_batch, run_eval, tokens_per_step
from moe.train import lock as lock_lib
from moe.train import machine
from moe.train import metrics as metrics_lib
from moe.train import peaks
from moe.train import preemption
from moe.train import step as step_lib
from moe.train import upcycle
from moe.train.checks import check_divisible, check_workdir, config_warnings, validate_config



# ----------------------------------------------------------------------------- 4./5. shapes


@dataclasses.dataclass
class Setup:
  """Everything a run needs before compiling: built by `setup`, shared with `evaluate`."""

  cfg: Any
  workdir: str
  mesh: Any
  data: Any
  model_cfg: Any
  model: nn.Module
  init_fn: Any  # rng -> {"params": ..., "moe_bias": ...} (unboxed)
  abstract: dict  # ShapeDtypeStructs of init_fn's output, with shardings
  shardings: dict  # NamedShardings like init_fn's output
  batch_sharding: NamedSharding


def enable_compilation_cache(workdir: str) -> None:
  """XLA executables cached on disk in `<workdir>/../.jax_cache` (beside the runs, like the data
  cache; for a remote workdir a local `~/.cache/moe/jax_cache`, `moe.rundir.cache_dir`), unless
  JAX_COMPILATION_CACHE_DIR / jax's config already names a directory. A resumed run, and every
  seed of a sweep, then skips most of the compilation."""
  if jax.config.jax_compilation_cache_dir:
    return
  path = rundir.cache_dir(workdir, ".jax_cache")
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def setup(cfg, workdir: str) -> Setup:
  """Phases 1-5: validate, mesh, data, shapes, shardings. Nothing is compiled here."""
  # 1. validate: every static check once (the mesh's included), then the workdir
  validate_config(cfg)
  for warning in config_warnings(cfg):
    logging.warning("config: %s", warning)
  check_workdir(workdir)
  enable_compilation_cache(workdir)
  # 2. mesh
  mesh = make_mesh(cfg.mesh)
  # 3. data
  t_data = time.time()
  data = data_lib.make_data(cfg, workdir=workdir, process_index=jax.process_index(),
                            process_count=jax.process_count())
  logging.info("%s", metrics_lib.describe_data(data.info, since=t_data))
  # Checked in 1 with a stand-in vocabulary (moe.model.config.VOCAB_STAND_IN); now the real one.
  check_vocab_size(cfg, data.tokenizer.vocab_size)
  model_cfg = model_config_from(cfg, vocab_size=data.tokenizer.vocab_size)
  model = Transformer(model_cfg)
  # 4. shapes
  B, L = cfg.train.batch_size, cfg.data.seq_len

  def boxed_init(rng):
    params_rng, jitter_rng = jax.random.split(rng)
    variables = model.init({"params": params_rng, "jitter": jitter_rng, "dropout": jitter_rng},
                           jnp.zeros((B, L), jnp.int32), train=False)
    return {"params": variables["params"], "moe_bias": variables.get("moe_bias", {})}

  with sharding_lib.activate(mesh):
    boxed = jax.eval_shape(boxed_init, jax.ShapeDtypeStruct((2,), jnp.uint32))
  # 5. shardings
  specs = nn.get_partition_spec(boxed)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)
  unboxed = nn.meta.unbox(boxed)
  check_divisible(unboxed, shardings, mesh)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          unboxed, shardings)
  return Setup(cfg=cfg, workdir=workdir, mesh=mesh, data=data, model_cfg=model_cfg, model=model,
               init_fn=lambda rng: nn.meta.unbox(boxed_init(rng)), abstract=abstract,
               shardings=shardings, batch_sharding=logical_sharding(mesh, ("batch", "length")))


def _opt_shardings(tx, abstract_params, param_shardings, mesh):
  """(abstract optimizer state, its shardings): a leaf that mirrors a param (Adam's mu and nu:
  its key path ends with the param's path and it has the param's shape) is sharded like the
  param, anything else (counts) is replicated. Frozen params' slots are `optax.MaskedNode`s,
  which hold no array."""
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  by_path = {}
  for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                              jax.tree.leaves(param_shardings)):
    by_path[tuple(trees.key_names(path))] = (tuple(leaf.shape), sh)

  def pick(path, leaf):
    names = tuple(trees.key_names(path))
    for start in range(len(names)):
      hit = by_path.get(names[start:])
      if hit is not None and hit[0] == tuple(leaf.shape):
        return hit[1]
    return sharding_lib.replicated(mesh)

  return abstract_opt, jax.tree_util.tree_map_with_path(pick, abstract_opt)


# ----------------------------------------------------------------------------- evaluation


def evaluate(cfg, workdir: str) -> dict:
  """Evaluates the newest checkpoint in `workdir` under `cfg` (e.g. another eval capacity factor).

  Returns the eval metrics (eval_loss, eval_cross_entropy, eval_bits_per_byte, ...).
  """
  s = setup(cfg, workdir)
  directory = rundir.join(workdir, CHECKPOINTS_DIR)
  abstract = {k: v for k, v in s.abstract.items() if v}  # moe_bias is {} in a dense model
  loaded = ckpt_lib.load_state_items(directory, abstract, where=f"--workdir={workdir}")
  loaded.setdefault("moe_bias", {})
  eval_step = jax.jit(step_lib.make_eval_step(s.model))
  batches = [global_batch(b, s.batch_sharding) for b in s.data.eval_batches()]
  with sharding_lib.activate(s.mesh):
    return run_eval(eval_step, loaded["params"], loaded["moe_bias"], batches)


# ----------------------------------------------------------------------------- training


def train_and_evaluate(cfg, workdir: str, *, stop_at_step: int | None = None) -> dict:
  """Trains `cfg` in `workdir` (resuming if it holds a checkpoint); returns the summary.

  `stop_at_step`: stop once this step is reached as if preempted (checkpoint, status
  "preempted"), for time-sliced jobs and for resume tests; the schedule still targets
  `train.steps`. SIGTERM / SIGINT at any point: see `moe.train.preemption`. One run per workdir
  (`moe.train.lock`); out of memory is a one-line ConfigError naming the sizes.
  """
  t_start = time.time()
  runconfig.check_saved(cfg, workdir, runconfig.RESUME_MAY_CHANGE)  # a resume keeps its config
  check_workdir(workdir)
  with preemption.PreemptionGuard() as guard, \
      lock_lib.workdir_lock(workdir, primary=jax.process_index() == 0):
    # Phases 1-5: validate, mesh, data, shapes, shardings (nothing compiled).
    s = setup(cfg, workdir)
    try:
      return _train(cfg, workdir, s, guard, stop_at_step, t_start)
    except ConfigError:
      raise
    except Exception as e:  # noqa: BLE001 - only XLA's out-of-memory is reworded
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      raise _out_of_memory(cfg, s, e) from None
    finally:
      s.data.train_iter.close()  # grain's threads and processes must not outlive the run


def _out_of_memory(cfg, s: Setup, e: BaseException) -> ConfigError:
  detail = next((ln.strip() for ln in str(e).splitlines() if "RESOURCE_EXHAUSTED" in ln), "")
  return ConfigError(
      f"out of memory with train.batch_size={cfg.train.batch_size}, data.seq_len="
      f"{cfg.data.seq_len} and {count_params(s.abstract['params']):,} parameters "
      f"(model.d_model={cfg.model.d_model}, model.num_layers={cfg.model.num_layers}, "
      f"moe.num_experts={cfg.moe.num_experts}) on {jax.device_count()} "
      f"{jax.devices()[0].platform} device(s): lower train.batch_size or the model size "
      f"[{detail[:160]}]")


def _train(cfg, workdir: str, s: Setup, guard, stop_at_step, t_start) -> dict:
  """Phases 6-10 (`train_and_evaluate` holds the lock and the signal handlers)."""
  tc = cfg.train
  tx, frozen, schedule = step_lib.make_optimizer(tc, s.abstract["params"])
  if all(jax.tree.leaves(frozen)):
    raise ConfigError(f"train.trainable={tc.trainable!r} leaves no parameter to train in this "
                      "model (e.g. 'moe' in a dense model)")
  abstract_state, state_shardings = _abstract_state(s, tx)
  flops = _Flops(cfg, s)
  checkpointer = ckpt_lib.Checkpointer(rundir.join(workdir, CHECKPOINTS_DIR),
                                       keep=tc.keep_checkpoints)
  compile_s, ok = 0.0, False
  try:
    # Phases 6-9 trace and run under the mesh (`jax.set_mesh` + the logical axis rules), which
    # is what lets activation constraints and the expert-parallel MoE layer see it.
    with sharding_lib.activate(s.mesh):
      # 6. checkpoint: the newest intact one that fits (else a one-line error), restored.
      t_init = time.time()
      resumed = _resume(cfg, workdir, s, checkpointer, abstract_state)
      resume_step = resumed[0] if resumed else None
      if jax.process_index() == 0:  # the config fits: the run keeps it (resume, eval, convert)
        runconfig.save(cfg, workdir)
      moved = machine.record(workdir, resume_step)  # devices.json; another machine warns
      if moved:
        logging.warning("%s", moved)
      # 7. init: sharded by construction (or init_from's params and bias), unless resumed.
      state = (resumed[1] if resumed else
               _initial_state(cfg, s, tx, state_shardings, fresh=True))
      # 8. step: compiled ahead of the loop, so compile time is reported on its own; not at
      # all when a signal already asked to stop.
      train_step, t_compile = None, time.time()
      if not guard.requested():
        train_step = jax.jit(step_lib.make_train_step(s.model, tx, frozen, schedule),
                             in_shardings=(state_shardings, s.batch_sharding),
                             out_shardings=(state_shardings, None), donate_argnums=(0,))
        train_step = train_step.lower(abstract_state, _batch_shapes(cfg, s)).compile()
        compile_s = time.time() - t_compile
        logging.info("state initialized in %.1f s; train step compiled in %.1f s",
                     t_compile - t_init, compile_s)
      eval_step = jax.jit(step_lib.make_eval_step(s.model))
      eval_batches = [global_batch(b, s.batch_sharding) for b in s.data.eval_batches()]
      # 9. loop
      loop = Loop(cfg, workdir, s, checkpointer, train_step, eval_step, eval_batches,
                   last_saved=resume_step, flops=flops,
                   log_state=resumed[2] if resumed else None)
      state = loop.run(state, stop_at_step, guard)
    ok = True
  finally:
    if ok:
      checkpointer.close()
    else:  # already failing: the checkpointer's own error must not hide the first one
      try:
        checkpointer.close()
      except Exception:  # noqa: BLE001
        pass
  loop.log.close()
  if jax.process_index() == 0:
    load_plot.write_load_plot(workdir)
  return _summary(cfg, workdir, s, loop, flops, resume_step, compile_s, t_start)


def _summary(cfg, workdir, s: Setup, loop, flops, resume_step, compile_s, t_start) -> dict:
  """10. `workdir/summary.json` (process 0 writes it); returned too."""
  summary = {
      "status": loop.status, "step": loop.step, "steps": cfg.train.steps, **loop.last_eval,
      "tokens_per_s": (loop.train_steps * tokens_per_step(cfg) / loop.train_time
                       if loop.train_time > 0 else None),
      "train_time_s": round(loop.train_time, 3), "compile_time_s": round(compile_s, 3),
      "wall_time_s": round(time.time() - t_start, 3), "resumed_from_step": resume_step,
      "num_params": flops.num_params, "num_active_params": flops.num_active,
      **flops.summary(loop.train_steps, loop.train_time),
      "devices": jax.device_count(), "processes": jax.process_count(),
      "mesh": {k: int(v) for k, v in s.mesh.shape.items()}, "data": s.data.info,
      **loop.stability(),  # loss_spikes, diverged_reason (moe.train.divergence)
  }
  if jax.process_index() == 0:
    write_json_atomic(rundir.join(workdir, SUMMARY_FILE), summary, indent=2)
  logging.info("%s at step %d: eval_loss %.4f (%s)", loop.status, loop.step,
               loop.last_eval.get("eval_loss", float("nan")),
               rundir.join(workdir, SUMMARY_FILE))
  return summary


class _Flops:
  """Model FLOPs of a training step (`moe.model.flops`) and the device's peak
  (`moe.train.peaks`): TFLOP/s per device and MFU for the records and the summary."""

  def __init__(self, cfg, s: Setup):
    self.per_token = flops_per_token(s.model_cfg, cfg.data.seq_len).train
    self.per_step = self.per_token * tokens_per_step(cfg)
    self.devices = jax.device_count()
    self.peak = peaks.device_peak(jax.devices()[0], s.model_cfg.dtype)
    self.num_params = count_params(s.abstract["params"])
    self.num_active = active_params(s.model_cfg)
    logging.info("%s", metrics_lib.describe_model(self.num_params, self.num_active,
                                                  self.per_token, self.peak))

  def rates(self, steps_per_s: float) -> dict:
    return peaks.throughput(self.per_step, steps_per_s, self.devices, self.peak)

  def summary(self, steps: int, seconds: float) -> dict:
    out = {"train_flops_per_token": self.per_token,
           "peak_tflops_per_device": self.peak.flops_per_s / 1e12 if self.peak else None,
           "peak_source": self.peak.source if self.peak else None}
    if seconds > 0:
      out.update(self.rates(steps / seconds))
    return out


def _batch_shapes(cfg, s: Setup) -> dict:
  B, L = cfg.train.batch_size, cfg.data.seq_len
  floats = ("loss_mask", "target_bytes")
  return {k: jax.ShapeDtypeStruct((B, L), jnp.float32 if k in floats else jnp.int32,
                                  sharding=s.batch_sharding) for k in BATCH_KEYS}


def _abstract_state(s: Setup, tx) -> tuple[dict, dict]:
  """The training state as ShapeDtypeStructs with shardings, and the shardings alone."""
  rep = sharding_lib.replicated(s.mesh)
  abstract_opt, opt_shardings = _opt_shardings(tx, s.abstract["params"], s.shardings["params"],
                                               s.mesh)
  shardings = {"step": rep, "params": s.shardings["params"], "opt_state": opt_shardings,
               "moe_bias": s.shardings["moe_bias"], "rng": rep}
  abstract = {
      "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
      "params": s.abstract["params"],
      "opt_state": jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                abstract_opt, opt_shardings),
      "moe_bias": s.abstract["moe_bias"],
      "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)}
  return abstract, shardings


def _resume(cfg, workdir, s: Setup, checkpointer, abstract_state):
  """(step, state, log_state) of the newest intact checkpoint that fits (the data iterator set
  to its position), or None (then init_from, if any, must fit). One-line ConfigError when a
  checkpoint does not fit or none is intact; damaged ones are skipped with a warning."""
  tc = cfg.train

  def fits(step):
    ckpt_lib.check_compatible(
        ckpt_lib.saved_state_shapes(checkpointer.directory, step), abstract_state,
        where=f"the checkpoint in --workdir={workdir} (step {step})",
        fix="use a fresh --workdir or the config that wrote it")

  found = checkpointer.restore_newest(abstract_state, fits)
  checkpointer.prune()
  if found is not None:
    step, state, data_state, log_state = found
    s.data.train_iter.set_state(data_state)
    logging.info("resumed from %s/%d", checkpointer.directory, step)
    return step, state, log_state
  if tc.init_from and not tc.upcycle:
    directory, step = ckpt_lib.resolve(tc.init_from)
    ckpt_lib.check_compatible(
        ckpt_lib.saved_state_shapes(directory, step), s.abstract["params"],
        where=f"train.init_from={tc.init_from!r} (step {step})",
        fix=_init_from_fix(cfg), prefix="params/")
  return None


def _init_from_fix(cfg) -> str:
  diff = runconfig.architecture_diff(cfg, cfg.train.init_from)
  return ("init_from needs a checkpoint of the same architecture"
          + (f" (its run's config.json differs in {diff})" if diff else ""))


def _initial_state(cfg, s: Setup, tx, shardings, *, fresh: bool) -> dict:
  """Step-0 state: params (or init_from's when `fresh`), a fresh optimizer, the run's rng."""
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(cfg.train.seed))
  variables = jax.jit(s.init_fn, out_shardings=s.shardings)(init_rng)
  params, moe_bias = variables["params"], variables["moe_bias"]
  if fresh and cfg.train.init_from:
    params = _initial_params(cfg, s)
    moe_bias = _initial_moe_bias(cfg, s, moe_bias)
  opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
  return {"step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"]),
          "params": params, "opt_state": opt_state, "moe_bias": moe_bias,
          "rng": jax.device_put(train_rng, shardings["rng"])}


def _initial_params(cfg, s: Setup):
  """`train.init_from`: the params of another checkpoint (same architecture), or a dense
  checkpoint turned into this MoE model by `moe.train.upcycle` (`train.upcycle`)."""
  tc = cfg.train
  if tc.upcycle:
    dense = ckpt_lib.load_params(tc.init_from)  # as stored: an import may be bfloat16
    dense = jax.tree.map(lambda x: x.astype("float32"), dense)
    new = upcycle.upcycle_params(dense, s.abstract["params"], cfg)
    return jax.device_put(new, s.shardings["params"])
  return ckpt_lib.load_params(tc.init_from, s.abstract["params"], where="train.init_from")


def _initial_moe_bias(cfg, s: Setup, fresh):
  """`train.init_from`'s balancing bias when it saved one (e.g. a converted DeepSeek-V3's
  correction bias, part of its function), else the fresh zeros."""
  tc = cfg.train
  if tc.upcycle or not fresh:
    return fresh
  directory, step = ckpt_lib.resolve(tc.init_from)
  if not any(k.startswith("moe_bias/") for k in ckpt_lib.saved_state_shapes(directory, step)):
    return fresh
  return ckpt_lib.load_state_items(tc.init_from, {"moe_bias": s.abstract["moe_bias"]},
                                   where="train.init_from")["moe_bias"]

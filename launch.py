r"""Train a config, run a sweep, evaluate a checkpoint or complete a prompt with a trained model.

  python launch.py --config=configs/default.py --workdir=runs/default
  python launch.py --config=configs/default.py --workdir=runs/e16 --config.moe.num_experts=16
  python launch.py --config=configs/ablations/capacity.py --workdir=runs/capacity --sweep_shard=0/2
  python launch.py --workdir=runs/e16                   # resume with the saved config.json
  python launch.py --workdir=runs/default --mode=complete --prompt='def fib(n):' --show_routing
  python launch.py --workdir=runs/default --mode=eval [--step=300 | --checkpoint=PATH]
      [--eval_split=train | --eval_file=notes.txt]
  python launch.py --workdir=runs/default --mode=analyze [--analyze_batches=8 | --text_file=F]

- `--config.<group>.<field>=<value>` overrides one field; an unknown field is an error (the
  config is locked). `--config.<group>.<field>=None` sets a field to None, e.g.
  `--config.moe.capacity_factor=None` (dropless). Config loading is `moe.cli`'s (shared with
  `python -m moe.convert`): a broken config file is one line too.
- A run writes its resolved config to `<workdir>/config.json` (`moe.runconfig`); without
  `--config`, resume, `--mode=complete` and `--mode=eval` use it (overrides still apply). A
  `--config` that differs from it is refused in one line naming the fields, except those that
  may change (`moe.runconfig.RESUME_MAY_CHANGE`: steps, logging/eval/checkpoint intervals, the
  mesh, ...; `EVAL_MAY_CHANGE` for complete / eval).
- `--mode=eval` (`moe.train.evaluate`): cross-entropy, bits per byte, perplexity, drop fraction
  and per-layer load of a checkpoint on the validation split, `--eval_split` or `--eval_file`;
  writes `<workdir>/eval_<what>_step<N>.json` and prints one line.
- `--mode=analyze` (`moe.inference.analysis`): the routing of an MoE checkpoint on validation
  batches or `--text_file` (load, vocabulary and domain specialization, co-activation, router
  saturation over the kept checkpoints) into `<workdir>/analysis/`; prints a short summary.
- A config with a top-level `sweep` group is a sweep (`moe.sweep.runner.run`); `--sweep_shard=i/n`
  runs the i-th of n round-robin slices, so n machines can share one sweep.
- Several processes (multi-host): `--coordinator_address=host:port --num_processes=N
  --process_id=i` on each, or `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`,
  or nothing at all under `srun`, `mpirun`, a TPU pod or TPU on GKE (`moe.distributed` says which
  launcher it recognised and calls `jax.distributed.initialize` as that one needs).

Exit codes: 0 finished, or stopped by SIGTERM or Ctrl-C (SIGINT) at any moment after the flags
are parsed: the run saves a checkpoint of the steps trained since the last one and summary.json
says "preempted" (at "step" 0, with a checkpoint of the initial state, when nothing was trained
yet; a signal during data preparation or compilation takes effect when that phase ends); run
the same command again to resume. A second signal of the same kind ends the process at once
(143 for SIGTERM, 130 for SIGINT). 2 an error of one line on stderr (`error: ...`): a user
mistake (nothing compiled), out of memory (naming the batch and model sizes), another run
holding the workdir, a failed checkpoint save (e.g. a full disk; the previous checkpoint stays
usable), or no intact checkpoint left. 3 the loss diverged (summary.json says "diverged").
Anything else is a crash with its traceback.

Run as a program, it first tells glibc's malloc to keep freed memory (`moe.allocator`: XLA:CPU
allocates its large buffers afresh every step); `MOE_SYSTEM_MALLOC=1` keeps the defaults.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys
import tempfile
import traceback

# TensorFlow's C++ INFO/WARNING lines off (set before the first TF import: clu, TFDS).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if __name__ == "__main__":  # before JAX allocates: the trainer's (and benchmarks') malloc setting
  from moe import allocator  # standard library only; MOE_SYSTEM_MALLOC=1 keeps glibc's defaults
  allocator.apply()

from absl import app
from absl import flags
from absl import logging
import jax

from moe import cli
from moe.errors import ConfigError
from moe.rundir import SUMMARY_FILE

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, summary, "
                               "config.json.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "complete", "eval", "analyze"],
                          "train: train (or resume) the config; complete: continue --prompt with "
                          "the newest checkpoint in --workdir; eval: evaluate a checkpoint; "
                          "analyze: the routing analysis of the newest checkpoint.")
_STEP = flags.DEFINE_integer("step", None, "--mode=eval: the checkpoint step (default: newest).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "--mode=eval: a checkpoint (workdir, checkpoints/ or a step "
                                  "directory) instead of --workdir's newest.")
_EVAL_SPLIT = flags.DEFINE_string("eval_split", None,
                                  "--mode=eval: the data split to evaluate: validation (default), "
                                  "train, or any split of a TFDS data.name, e.g. test.")
_EVAL_FILE = flags.DEFINE_string("eval_file", None,
                                 "--mode=eval: a text file to evaluate instead of a split.")
_TEXT_FILE = flags.DEFINE_string("text_file", None,
                                 "--mode=analyze: a text file to analyze instead of validation.")
_ANALYZE_BATCHES = flags.DEFINE_integer("analyze_batches", 8,
                                        "--mode=analyze: validation batches to route.")
_PROMPT = flags.DEFINE_string("prompt", "", "--mode=complete: the text to continue.")
_SHOW_ROUTING = flags.DEFINE_bool("show_routing", False,
                                  "--mode=complete: show which experts each token chose.")
flags.DEFINE_integer("max_new_tokens", 128, "--mode=complete: most tokens to generate.")
flags.DEFINE_float("temperature", 0.7, "--mode=complete: sampling temperature; 0 = greedy.")
flags.DEFINE_float("top_p", 0.95, "--mode=complete: nucleus (top-p) probability mass.")
flags.DEFINE_integer("seed", 0, "--mode=complete: sampling seed (same seed, same text).")
flags.DEFINE_list("stop", [], "--mode=complete: stop strings, comma-separated (\\n allowed).")
_SWEEP_SHARD = flags.DEFINE_string("sweep_shard", "0/1",
                                   "Sweep configs: run slice i of n ('i/n') of the sweep's runs.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "Multi-process: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Multi-process: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "Multi-process: this process's index.")

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3


class UserError(Exception):
  """A command-line mistake: printed as one line, exit code 2."""


def fail(message: str) -> None:
  print(f"error: {message}".splitlines()[0], file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


# ----------------------------------------------------------------------------- flags


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing through `moe.cli` (one-line errors, exit 2; `--config.x=None`; the
  workdir's config.json when there is no --config)."""
  p = cli.prepare_argv(argv, "workdir")
  sys.argv[:] = p.argv  # config_flags reads its overrides from sys.argv
  try:
    rest = cli.parse(p, flags.FLAGS, _CONFIG, run_flag="workdir")
  except ConfigError as e:
    fail(str(e))
  if not flags.FLAGS.workdir:
    fail("--workdir is required (the run directory)")
  return rest


# ----------------------------------------------------------------------------- processes


def maybe_initialize_distributed() -> None:
  """`jax.distributed.initialize` as the flags or the cluster launcher need
  (`moe.distributed`: flags, JAX_* variables, SLURM, Open MPI / MPI, TPU on GKE, Cloud TPU VMs)."""
  from moe import distributed
  distributed.initialize(coordinator_address=_COORDINATOR.value,
                         num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)


# ----------------------------------------------------------------------------- main


def run(cfg) -> int:
  # Each mode imports only its own stack (sweep runner, generation, trainer): they pull in
  # TensorFlow, grain and matplotlib in different measure, and start-up time is the user's.
  if _MODE.value == "train":  # SIGTERM / Ctrl-C ask to save and stop from here on
    from moe.train import preemption  # standard library only
    preemption.install()
  try:
    maybe_initialize_distributed()
    workdir = _WORKDIR.value
    if "sweep" in cfg:
      import_tensorflow_quietly()
      if _MODE.value != "train":
        raise UserError("a sweep config runs with --mode=train only")
      from moe.sweep import runner as sweep
      sweep.run(cfg, workdir, shard=_SWEEP_SHARD.value)
      return 0
    if _SWEEP_SHARD.value != "0/1":
      raise UserError(f"--sweep_shard={_SWEEP_SHARD.value} needs a sweep config (one with a "
                      "top-level `sweep` group)")
    import_tensorflow_quietly()  # the training stack (clu, TFDS) imports it
    if _MODE.value == "complete":
      from moe.inference import generate
      generate.main(flags.FLAGS)
      return 0
    if _MODE.value == "eval":
      from moe.train import evaluate
      result = evaluate.run(cfg, workdir, step=_STEP.value, checkpoint=_CHECKPOINT.value,
                            split=_EVAL_SPLIT.value, text_file=_EVAL_FILE.value)
      if jax.process_index() == 0:
        print(evaluate.summary_line(result), flush=True)
      return 0
    if _MODE.value == "analyze":
      from moe.inference import analysis
      result = analysis.run(cfg, workdir, text_file=_TEXT_FILE.value,
                            batches=_ANALYZE_BATCHES.value)
      if jax.process_index() == 0:
        print("\n".join(analysis.summary_lines(result)), flush=True)
      return 0
    if _TEXT_FILE.value or _ANALYZE_BATCHES.present:
      raise UserError("--text_file and --analyze_batches go with --mode=analyze")
    if _STEP.value is not None or _CHECKPOINT.value or _EVAL_SPLIT.value or _EVAL_FILE.value:
      raise UserError("--step, --checkpoint, --eval_split and --eval_file go with --mode=eval")
    from moe.train import trainer as train
    summary = train.train_and_evaluate(cfg, workdir)
    if "eval_bits_per_byte" in summary and jax.process_index() == 0:
      print(f"{summary.get('status')} at step {summary.get('step')}: validation bits per byte "
            f"{summary['eval_bits_per_byte']:.4f}, cross-entropy "
            f"{summary['eval_cross_entropy']:.4f} nats/token ({workdir}/{SUMMARY_FILE})",
            flush=True)
    return EXIT_DIVERGED if summary.get("status") == "diverged" else 0
  except (ConfigError, UserError) as e:
    fail(str(e))
  except KeyboardInterrupt:  # a second Ctrl-C (the first one asks the run to save and stop)
    print("interrupted", file=sys.stderr, flush=True)
    return 130
  return 0


TF_BANNER = ("All log messages before absl::InitializeLog() is called are written to STDERR",
             "oneDNN custom operations are on", "This TensorFlow binary is optimized",
             "To enable the following instructions", "Unable to register cu")


def import_tensorflow_quietly() -> None:
  """Imports TensorFlow with its start-up banner dropped: it logs through absl's C++ logging
  before that is initialized (a warning saying so, then the oneDNN notice, once per shared
  library), straight to file descriptor 2, which TF_CPP_MIN_LOG_LEVEL does not reach. The
  import runs with fd 2 sent to a temporary file; every other line is passed on to stderr."""
  if "tensorflow" in sys.modules:
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      pass  # the stack that needs it reports that itself
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines = captured.read().decode(errors="replace").splitlines()
  rest = [l for l in lines if l.strip() and not any(b in l for b in TF_BANNER)]
  if rest:
    print("\n".join(rest), file=sys.stderr, flush=True)


class QuietLibraries(std_logging.Filter):
  """Drops library INFO chatter from the console (Orbax writes dozens of lines per checkpoint,
  JAX says it found no TPU, TFDS reports registries): warnings and errors always pass."""

  NOISY = ("/orbax/", "/jax/_src/xla_bridge", "/tensorflow_datasets/", "/etils/")

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.name == "asyncio" and (
        "/orbax/" in record.getMessage() or _raised_in_orbax(record.exc_info)):
      # A failed save's writes that Orbax's thread no longer awaits: asyncio reports each one
      # ("Task exception was never retrieved" naming an Orbax coroutine, or "Future exception
      # was never retrieved" with a traceback through Orbax's writer) when it is collected.
      return False
    if "/orbax/" in record.pathname and record.exc_info:
      # A failed save is reported once, in one line (moe.train.checkpoint.CheckpointError);
      # Orbax's writer threads log it too: keep their line, drop their traceback.
      record.exc_info, record.exc_text = None, None
    return record.levelno >= std_logging.WARNING or not any(
        n in record.pathname for n in self.NOISY)


def _raised_in_orbax(exc_info) -> bool:
  """Whether a logged exception's traceback passes through Orbax's code."""
  if not exc_info or len(exc_info) < 3 or exc_info[2] is None:
    return False
  return any("/orbax/" in frame.filename for frame in traceback.extract_tb(exc_info[2]))


def ignore_closed_event_loops() -> None:
  """When a checkpoint save fails (a full disk), Orbax's background thread ends its asyncio event
  loop while TensorStore writes are still in flight; each of them then reports, as an
  "unraisable" exception, that it could not call back into the closed loop: dozens of identical
  tracebacks around the one-line error. Those (and only those) are dropped."""
  previous = sys.unraisablehook

  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
      return
    previous(unraisable)

  sys.unraisablehook = hook


def main(argv: list[str]) -> None:
  logging.get_absl_handler().addFilter(QuietLibraries())
  ignore_closed_event_loops()
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]} (flags look like --name=value)")
  sys.exit(run(_CONFIG.value))


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  app.run(main, flags_parser=parse_flags)

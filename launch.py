r"""Train a config, run a sweep, or complete a prompt with a trained model.

  python launch.py --config=configs/default.py --workdir=runs/default
  python launch.py --config=configs/default.py --workdir=runs/e16 --config.moe.num_experts=16
  python launch.py --config=configs/ablations/capacity.py --workdir=runs/capacity --sweep_shard=0/2
  python launch.py --config=configs/default.py --workdir=runs/default --mode=complete \
      --prompt='def fib(n):' --show_routing

- `--config.<group>.<field>=<value>` overrides one field; an unknown field is an error (the
  config is locked). `--config.<group>.<field>=None` sets a field to None, e.g.
  `--config.moe.capacity_factor=None` (dropless): ml_collections cannot parse "None" for a typed
  field, so launch.py takes those flags out of argv before absl parses it and sets the fields
  right after (the config's validation then says if None is not allowed there).
- A config with a top-level `sweep` group is a sweep (`moe.sweep.runner.run`); `--sweep_shard=i/n`
  runs the i-th of n round-robin slices, so n machines can share one sweep.
- Several processes (multi-host): `--coordinator_address=host:port --num_processes=N
  --process_id=i` on each, or `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`,
  or nothing at all under `srun`, `mpirun`, a TPU pod or TPU on GKE (`moe.distributed` says which
  launcher it recognised and calls `jax.distributed.initialize` as that one needs).

Exit codes: 0 finished (also after SIGTERM: the run saved a checkpoint and summary.json says
"preempted"; run the same command again to resume); 2 a user error (one line on stderr,
`error: ...`, nothing compiled); 3 the loss diverged (summary.json says "diverged"); anything
else is a crash with its traceback.
"""

from __future__ import annotations

import importlib.util
import logging as std_logging
import os
import re
import sys
import tempfile

# TensorFlow's C++ INFO/WARNING lines off (set before the first TF import: clu, TFDS).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from moe.errors import ConfigError
from moe.rundir import SUMMARY_FILE

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/default.py; override fields with "
    "--config.<group>.<field>=<value>.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, summary.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "complete"],
                          "train: train (or resume) the config; complete: continue --prompt with "
                          "the newest checkpoint in --workdir.")
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
_NONE_OVERRIDE = re.compile(r"^--?config\.([\w.]+)=(none|None|null)$")


class UserError(Exception):
  """A command-line mistake: printed as one line, exit code 2."""


def fail(message: str) -> None:
  print(f"error: {message}".splitlines()[0], file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


# ----------------------------------------------------------------------------- flags


def _config_path(argv: list[str]) -> str | None:
  for i, a in enumerate(argv):
    m = re.match(r"^--?config(=(.*))?$", a)
    if m:
      return m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
  return None


def _load_config_file(path: str):
  """The config a `--config=path[:arg]` names, loaded the way ml_collections does."""
  file, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("_launch_config", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _unknown_field(argv: list[str]) -> str | None:
  """Names the first `--config.a.b` override that is not a field of the config."""
  path = _config_path(argv)
  if not path:
    return None
  try:
    cfg = _load_config_file(path)
  except Exception:  # noqa: BLE001 - the caller reports the original error
    return None
  for a in argv:
    m = re.match(r"^--?(?:no)?config\.([\w.]+)(=|$)", a)
    if not m:
      continue
    node, walked = cfg, []
    for part in m.group(1).split("."):
      if not hasattr(node, "keys") or part not in node:
        where = ".".join(walked) or "the config"
        fields = sorted(node.keys()) if hasattr(node, "keys") else []
        return (f"--config.{m.group(1)}: {where} has no field {part!r}"
                + (f" (fields: {', '.join(fields)})" if fields else ""))
      node = node[part]
      walked.append(part)
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors (exit 2) and `--config.x=None` support."""
  nones = [m.group(1) for a in argv if (m := _NONE_OVERRIDE.match(a))]
  argv = [a for a in argv if not _NONE_OVERRIDE.match(a)]
  sys.argv[:] = argv  # config_flags reads its overrides from sys.argv
  path = _config_path(argv)
  if path and not os.path.isfile(path.partition(":")[0]):
    fail(f"--config={path}: no such file")
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    fail(_unknown_field(argv) or str(e))
  except (AttributeError, KeyError) as e:  # locked config: an override names no field
    fail(_unknown_field(argv) or f"unknown config field {e}")
  except (OSError, ValueError, TypeError, SyntaxError) as e:  # the config file itself
    fail(f"--config={_config_path(argv)}: {type(e).__name__}: {e}")
  cfg = _CONFIG.value
  if cfg is None:
    fail("--config is required, e.g. --config=configs/default.py")
  try:
    "model" in cfg  # pylint: disable=pointless-statement  (a failed load raises here)
  except OSError as e:
    fail(f"--config={path}: {e}")
  for path in nones:
    *groups, leaf = path.split(".")
    node = cfg
    for g in groups:
      if not hasattr(node, "keys") or g not in node:
        fail(f"--config.{path}=None: the config has no field {path!r}")
      node = node[g]
    if not hasattr(node, "keys") or leaf not in node:
      fail(f"--config.{path}=None: the config has no field {path!r}")
    try:
      node[leaf] = None
    except (TypeError, ValueError) as e:
      fail(f"--config.{path}=None: {e}")
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
    return record.levelno >= std_logging.WARNING or not any(
        n in record.pathname for n in self.NOISY)


def main(argv: list[str]) -> None:
  logging.get_absl_handler().addFilter(QuietLibraries())
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]} (flags look like --name=value)")
  sys.exit(run(_CONFIG.value))


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  app.run(main, flags_parser=parse_flags)

"""Fine-tune a trained checkpoint on the standard library's own test files (`pystdlib_test`).

Run (after `python launch.py --config=configs/default.py --workdir=runs/default`):

  python launch.py --config=configs/finetune.py --workdir=runs/finetune \
      --config.train.init_from=runs/default [--config.train.trainable=non_moe]

The model groups are configs/default.py's, so they must match the checkpoint's architecture
(override them the same way as for the run that wrote it). Only the params are loaded from
`train.init_from` (its newest checkpoint, or `<dir>/checkpoints/<step>`); the optimizer starts
fresh with a lower peak learning rate and a short warmup, and the MoE balancing bias restarts at 0.
`train.trainable` picks what is updated: all | non_moe (ST-MoE's recommendation for sparse
models) | moe | router_frozen; frozen params keep their exact values.

A checkpoint converted from Hugging Face (`python -m moe.convert --from_hf=DIR --to=WORKDIR`)
is fine-tuned the same way with `--config=WORKDIR/config.py --config.train.init_from=WORKDIR`
and this file's train/data settings given as overrides.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.data.name = "pystdlib_test"  # Lib/test/**/*.py: held out of `pystdlib` pretraining
  c.train.init_from = "runs/default"  # the pretrained run (workdir, checkpoints/ or a step dir)
  c.train.trainable = "all"  # all | non_moe | moe | router_frozen
  c.train.steps = 200  # a third of the default run
  c.train.learning_rate = 1e-3  # peak, a third of pretraining's
  c.train.warmup_steps = 20
  c.train.min_lr_ratio = 0.1
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  c.train.log_every = 10
  return c

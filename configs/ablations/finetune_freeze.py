"""Which parameters to fine-tune in a sparse model: all vs non-MoE vs MoE only vs router frozen.

ST-MoE (Zoph et al. 2022), Sec. 4 ("Fine-tuning sparse models"): updating only the non-MoE
parameters fine-tunes about as well as updating all of them, while updating only the MoE
parameters does clearly worse; freezing the router is a common stability measure. The paper's
numbers were not read (direction only). Its setting, matched here at CPU size:

- MoE in few blocks: an MoE block every 2nd block at `cpu` (2 blocks: block 0 is MoE, block 1
  dense), every 4th at `accelerator` (8 blocks: blocks 0 and 4), in the parent and the table;
- a small fine-tuning set trained for many epochs, so that it overfits: the `test_capi` folder
  of the standard library's tests (`cpu`; about 82 KB of train text in 6 files, ~40 steps an
  epoch, 400 steps = ~10 epochs, 59 KB held out in 2 files, Python 3.11) or `test_email`
  (`accelerator`; about 530 KB train, 14 files held out with validation_fraction 0.2). These
  test files are not in the `pystdlib` pretraining text, and the split depends on the Python
  version's standard library;
- selection by the best held-out loss: the trainer keeps no best checkpoint and reports the last
  evaluation, so the table's metric is `min_eval_cross_entropy`, the smallest eval
  cross-entropy over the run's evaluations (every 20 steps at `cpu`; `moe.sweep.report`). It
  selects on the same held-out text it reports, identically for every member;
- three parents: one MoE parent per seed (`{seed}` in train.init_from: run s reads parent s).

Two commands (the sweep runner has no step that trains a shared parent first):

  1. the parents, MoE models pretrained on `pystdlib` at the table's scale:
       python launch.py --config=configs/ablations/finetune_freeze.py:parent \\
           --workdir=runs/finetune_freeze_parent
  2. the table: each member fine-tunes its seed's parent (PARENT below):
       python launch.py --config=configs/ablations/finetune_freeze.py \\
           --workdir=runs/finetune_freeze

Use the same `--config.sweep.scale` for both. CPU time, measured 2026-12-01 on the 2-core CPU
with the upcycling table running alongside: the 3 parents 2 min 27 s, the table 4 members x 3
seeds = 12 runs of 400 steps with 20 evaluations each 6 min 42 s (402 s of training); results in
experiments/ablation_results/finetune_freeze/.

Seeds from power (`python -m moe.sweep.power --workdir=runs/finetune_freeze
--parent=runs/finetune_freeze_parent` on that run; experiments/ablation_results/POWER.md): 3.00
one-core minutes a seed with its parent, so 60 minutes on 2 cores afford 39 seeds (39 parents and
156 runs); projected from the measured paired sd, the detectable effects fall from 0.047 / 0.038
/ 0.027 nats (claims A / B / C) at 3 seeds to 0.008 / 0.007 / 0.005 at 39. The committed results
are still the 3-seed run.
"""

import os
import sysconfig

from configs.ablations import _base

PARENT = "runs/finetune_freeze_parent/base/seed{seed}"  # command 1's checkpoints, one per seed
# MoE in few blocks (parent and table alike: init_from needs the same architecture).
ARCH_CPU = {"model.moe_interval": 2}
ARCH_ACCELERATOR = {"model.moe_interval": 4}
_TESTS = os.path.join(sysconfig.get_paths()["stdlib"], "test")
FINETUNE = {"data.name": "textdir", "train.init_from": PARENT,
            "train.learning_rate": 1e-3, "train.warmup_steps": 10}
FINETUNE_CPU = {**ARCH_CPU, "data.text_dir": os.path.join(_TESTS, "test_capi"),
                "data.validation_fraction": 0.2, "train.steps": 400, "train.eval_every": 20,
                "train.eval_batches": 8, "train.checkpoint_every": 400}
FINETUNE_ACCELERATOR = {**ARCH_ACCELERATOR, "data.text_dir": os.path.join(_TESTS, "test_email"),
                        "data.validation_fraction": 0.2, "train.steps": 2000,
                        "train.eval_every": 100, "train.eval_batches": 1,  # 64 KB < 87 KB held out
                        "train.learning_rate": 3e-4,
                        "train.warmup_steps": 100}
SEEDS = 39  # seeds 0 .. 38 (and their parents), from power (docstring)
METRIC = "min_eval_cross_entropy"  # best evaluation of the run (moe.sweep.report.MIN_PREFIX)


def get_config(arg: str = ""):
  if arg == "parent":
    return _base.make_config(
        __file__, title="finetune_freeze parents: MoE models pretrained on pystdlib, one per seed",
        paper="(parent runs of configs/ablations/finetune_freeze.py)", members=[{}],
        published=[], cpu=ARCH_CPU, accelerator=ARCH_ACCELERATOR, smoke_members=(0,),
        seeds=SEEDS)
  if arg:
    raise ValueError(f"configs/ablations/finetune_freeze.py takes no argument or ':parent', "
                     f"got {arg!r}")
  rules = ("all", "non_moe", "moe", "router_frozen")
  members = [{"train.trainable": r} for r in rules]
  i = {r: k for k, r in enumerate(rules)}
  not_read = "not read (direction only)"
  return _base.make_config(
      __file__,
      title="Fine-tuning a sparse model (MoE every 2nd block): which parameters to update "
            "(pystdlib -> a small test folder, many epochs, best held-out loss)",
      paper="Zoph et al., ST-MoE (2022), Sec. 4 (fine-tuning subsets of the parameters)",
      members=members, metric=METRIC,
      common=FINETUNE, cpu=FINETUNE_CPU, accelerator=FINETUNE_ACCELERATOR,
      published=[
          {"claim": "updating only the MoE parameters fine-tunes worse than updating all",
           "source": "ST-MoE Sec. 4", "published": not_read, "order": [i["all"], i["moe"]]},
          {"claim": "updating only the non-MoE parameters beats updating only the MoE parameters",
           "source": "ST-MoE Sec. 4", "published": not_read,
           "order": [i["non_moe"], i["moe"]]},
          {"claim": "updating only the non-MoE parameters is no worse than updating all "
                    "(margin 0.02 nats is this table's choice)",
           "source": "ST-MoE Sec. 4", "published": not_read, "kind": "no_worse",
           "margin": 0.02, "order": [i["non_moe"], i["all"]]},
      ],
      notes=[f"Every member starts from {PARENT}, the parent of its own seed (train them first: "
             "see the config's docstring).",
             "Metric: min_eval_cross_entropy, the best eval cross-entropy over the run's "
             "evaluations (the trainer keeps no best checkpoint); selected and reported on the "
             "same held-out files."],
      smoke_members=(0, 1),
      seeds=SEEDS,
  )

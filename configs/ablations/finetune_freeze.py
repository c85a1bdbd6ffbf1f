"""Which parameters to fine-tune in a sparse model: all vs non-MoE vs MoE only vs router frozen.

ST-MoE (Zoph et al. 2022), Sec. 4 ("Fine-tuning sparse models"): updating only the non-MoE
parameters fine-tunes about as well as updating all of them, while updating only the MoE
parameters does clearly worse; freezing the router is a common stability measure.

Two commands (the sweep runner has no step that trains a shared parent first):

  1. the parent, an MoE model pretrained on `pystdlib` at the table's scale:
       python launch.py --config=configs/ablations/finetune_freeze.py:parent \
           --workdir=runs/finetune_freeze_parent
  2. the table: each member fine-tunes that parent on `pystdlib_test` (PARENT below; every seed
     starts from the same parent, the seed changes the data order):
       python launch.py --config=configs/ablations/finetune_freeze.py \
           --workdir=runs/finetune_freeze

Use the same `--config.sweep.scale` for both. CPU time, measured 2026-11-29
on the 2-core CPU with a second table running alongside: the parent (one run of 1000 steps)
1 min 36 s, the table (4 members x 3 seeds = 12 runs of 150 steps) 2 min 59 s.
"""

from configs.ablations import _base

PARENT = "runs/finetune_freeze_parent/base/seed0"  # where command 1 leaves its checkpoint
FINETUNE = {"data.name": "pystdlib_test", "train.init_from": PARENT,
            "train.learning_rate": 1e-3, "train.warmup_steps": 10}
FINETUNE_CPU = {"train.steps": 150, "train.eval_every": 75, "train.checkpoint_every": 75}
FINETUNE_ACCELERATOR = {"train.steps": 4000, "train.eval_every": 1000,
                        "train.learning_rate": 3e-4, "train.warmup_steps": 200}


def get_config(arg: str = ""):
  if arg == "parent":
    parent = _base.make_config(
        __file__, title="finetune_freeze parent: an MoE model pretrained on pystdlib",
        paper="(parent run of configs/ablations/finetune_freeze.py)", members=[{}],
        published=[], smoke_members=(0,))
    parent.sweep.seeds = [0]  # one parent, shared by every seed of the table
    return parent
  if arg:
    raise ValueError(f"configs/ablations/finetune_freeze.py takes no argument or ':parent', "
                     f"got {arg!r}")
  rules = ("all", "non_moe", "moe", "router_frozen")
  members = [{"train.trainable": r} for r in rules]
  i = {r: k for k, r in enumerate(rules)}
  c = _base.make_config(
      __file__,
      title="Fine-tuning a sparse model: which parameters to update (pystdlib -> pystdlib_test)",
      paper="Zoph et al., ST-MoE (2022), Sec. 4 (fine-tuning subsets of the parameters)",
      members=members,
      common=FINETUNE, cpu=FINETUNE_CPU, accelerator=FINETUNE_ACCELERATOR,
      published=[
          {"claim": "updating only the MoE parameters fine-tunes worse than updating all",
           "source": "ST-MoE Sec. 4", "order": [i["all"], i["moe"]]},
          {"claim": "updating only the non-MoE parameters beats updating only the MoE parameters",
           "source": "ST-MoE Sec. 4", "order": [i["non_moe"], i["moe"]]},
      ],
      notes=[f"Every member starts from {PARENT} (train it first: see the config's docstring); "
             "non_moe vs all is expected to be within seed noise (ST-MoE: about equal)."],
      smoke_members=(0, 1),
  )
  return c

"""Sparse upcycling: dense continued vs upcycled MoE vs MoE from scratch, same extra budget.

Komatsuzaki et al., "Sparse Upcycling" (ICLR 2023), Fig. 1/2: initializing an MoE from a dense
checkpoint (experts = copies of the FFN, fresh router) beats continuing the dense model for the
same extra compute, and beats an MoE trained from scratch for that extra budget. OLMoE
(Muennighoff et al. 2024), Sec. 4: the head start shrinks with a large budget (a from-scratch
MoE catches up), so the last member trains from scratch for parent + extra steps.

Two commands (the sweep runner has no step that trains a shared parent first):

  1. the dense parent (SwiGLU FFN as wide as one expert) at the table's scale:
       python launch.py --config=configs/ablations/upcycling.py:parent \
           --workdir=runs/upcycling_parent
  2. the table (every member and seed reads the parent at PARENT below):
       python launch.py --config=configs/ablations/upcycling.py --workdir=runs/upcycling

Use the same `--config.sweep.scale` for both. CPU time, measured 2026-11-29
on the 2-core CPU with a second table running alongside: the parent (one run of 1000 steps)
59 s, the table (4 members x 3 seeds = 12 runs of 1000 steps, the last member 2000) 16 min 52 s.
"""

from configs.ablations import _base

PARENT = "runs/upcycling_parent/dense/seed0"  # where command 1 leaves its checkpoint
# The dense FFN is exactly one expert wide, so the experts are copies of it.
SAME_WIDTH_CPU = {"model.d_ff": _base.CPU["moe.expert_hidden"]}
SAME_WIDTH_ACCELERATOR = {"model.d_ff": _base.ACCELERATOR["moe.expert_hidden"]}
EXTRA = {"cpu": _base.CPU["train.steps"], "accelerator": _base.ACCELERATOR["train.steps"]}


def get_config(arg: str = ""):
  if arg == "parent":
    parent = _base.make_config(
        __file__, title="upcycling parent: the dense model", members=[{"moe.enabled": False}],
        paper="(parent run of configs/ablations/upcycling.py)", published=[],
        cpu=SAME_WIDTH_CPU, accelerator=SAME_WIDTH_ACCELERATOR, smoke_members=(0,))
    parent.sweep.seeds = [0]  # one parent, shared by every seed of the table
    return parent
  if arg:
    raise ValueError(f"configs/ablations/upcycling.py takes no argument or ':parent', got {arg!r}")
  dense_continued = {"moe.enabled": False, "train.init_from": PARENT}
  upcycled = {"train.init_from": PARENT, "train.upcycle": True}
  scratch = {}  # "base": the MoE from scratch, extra steps only
  scratch_total = {"train.steps": {k: 2 * v for k, v in EXTRA.items()}}
  members = [dense_continued, upcycled, scratch, scratch_total]
  return _base.make_config(
      __file__,
      title="Sparse upcycling vs dense continued vs MoE from scratch (same extra steps)",
      paper="Komatsuzaki et al., Sparse Upcycling (ICLR 2023), Fig. 1-2; Muennighoff et al., "
            "OLMoE (2024), Sec. 4",
      members=members,
      cpu=SAME_WIDTH_CPU, accelerator=SAME_WIDTH_ACCELERATOR,
      published=[
          {"claim": "upcycling beats continuing the dense model for the same extra steps",
           "source": "Sparse Upcycling Fig. 1", "order": [1, 0]},
          {"claim": "upcycling beats an MoE from scratch given only the extra steps",
           "source": "Sparse Upcycling Fig. 2", "order": [1, 2]},
          {"claim": "a from-scratch MoE with parent + extra steps beats one with the extra steps",
           "source": "OLMoE Sec. 4 (scratch catches up with budget)", "order": [3, 2]},
      ],
      notes=[f"Members 0-1 start from {PARENT} (train it first: see the config's docstring); "
             "members 2-3 train from scratch for the extra steps and for parent + extra steps."],
      smoke_members=(0, 1),
  )

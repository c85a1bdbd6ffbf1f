"""Sparse upcycling vs dense continued (same steps and 1.5x the steps) vs MoE from scratch at
1x .. 4x the extra steps, three dense parents.

Komatsuzaki et al., "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints"
(ICLR 2023), abstract: upcycled T5 models "significantly outperform their dense counterparts
... using only ~50% of the initial dense pretraining sunk cost", and "also outperform sparse
models trained from scratch on 100% of the initial dense pretraining computation budget" (the
figures' numbers were not read: direction only). OLMoE (Muennighoff et al. 2024), Sec. 4
(upcycling): an MoE trained from scratch catches up with the upcycled one given enough extra
compute (numbers not read).

Compute matching: the upcycled MoE (E=8, top-2, experts as wide as the dense FFN) does twice the
dense model's FFN FLOPs per token, 1.44x its training FLOPs per token in all at `cpu` and 1.50x
at `accelerator` (`moe.model.flops.flops_per_token`; attention, embedding and output cost the
same in both), so "dense continued for the same steps" is not compute-matched; the member
dense-continued for 1.5x the steps is (within 5%: tests/sweep/test_matched_designs.py). The
from-scratch MoE runs 1x, 2x, 3x and 4x the extra steps; the table's rows locate where it
catches up with the upcycled model.

Parents: three dense parents, one per seed (parent seed s is read by every table run with seed
s through `{seed}` in train.init_from, `moe.sweep.spec`), so a seed's paired comparison shares
one parent and the three seeds span three parents.

Two commands (the sweep runner has no step that trains a shared parent first):

  1. the dense parents (SwiGLU FFN as wide as one expert) at the table's scale:
       python launch.py --config=configs/ablations/upcycling.py:parent \\
           --workdir=runs/upcycling_parent
  2. the table (run s reads the parent at PARENT below with {seed} = s):
       python launch.py --config=configs/ablations/upcycling.py --workdir=runs/upcycling

Use the same `--config.sweep.scale` for both. CPU time, measured 2026-12-01 on the 2-core CPU
with one to three other runs alongside (the fine-tuning table, then the adaptive-k and z-loss
tables): the 3 parents 1 min 42 s, the table 7 members x 3 seeds = 21 runs (12 500 steps a seed)
50 min 21 s (3016 s of training); results in experiments/ablation_results/upcycling/.

Seeds from power (`python -m moe.sweep.power --workdir=runs/upcycling
--parent=runs/upcycling_parent` on that run; experiments/ablation_results/POWER.md): 17.3 minutes
of run wall time a seed with its parent, measured while runs shared the cores, so 6 seeds (6
parents, 42 runs) is a conservative count for 60 minutes on 2 cores; projected from the measured
paired sd, the detectable effects fall from 0.012-0.035 nats at 3 seeds to 0.006-0.018 at 6. The
committed results are still the 3-seed run.
"""

from configs.ablations import _base

PARENT = "runs/upcycling_parent/dense/seed{seed}"  # command 1's checkpoints, one per seed
# The dense FFN is exactly one expert wide, so the experts are copies of it.
SAME_WIDTH_CPU = {"model.d_ff": _base.CPU["moe.expert_hidden"]}
SAME_WIDTH_ACCELERATOR = {"model.d_ff": _base.ACCELERATOR["moe.expert_hidden"]}
EXTRA = {"cpu": _base.CPU["train.steps"], "accelerator": _base.ACCELERATOR["train.steps"]}
SCRATCH_MULTIPLES = (1, 2, 3, 4)  # from-scratch MoE steps, in units of the extra steps
SEEDS = 6  # seeds 0 .. 5 (and their parents), from power (docstring)


DENSE_MATCHED = 1.5  # dense-continued steps matching the upcycled model's FLOPs (see above)


def steps(multiple: float) -> dict:
  return {k: int(multiple * v) for k, v in EXTRA.items()}


def get_config(arg: str = ""):
  if arg == "parent":
    parent = _base.make_config(
        __file__, title="upcycling parents: the dense model, one per seed",
        members=[{"moe.enabled": False}], paper="(parent runs of configs/ablations/upcycling.py)",
        published=[], cpu=SAME_WIDTH_CPU, accelerator=SAME_WIDTH_ACCELERATOR, smoke_members=(0,),
        seeds=SEEDS)
    return parent  # one parent per table seed
  if arg:
    raise ValueError(f"configs/ablations/upcycling.py takes no argument or ':parent', got {arg!r}")
  dense_continued = {"moe.enabled": False, "train.init_from": PARENT}
  upcycled = {"train.init_from": PARENT, "train.upcycle": True}
  dense_matched = {**dense_continued, "train.steps": steps(DENSE_MATCHED)}
  scratch = [{} if m == 1 else {"train.steps": steps(m)} for m in SCRATCH_MULTIPLES]
  members = [dense_continued, upcycled, *scratch, dense_matched]
  i = members.index
  not_read = "not read (direction only)"
  return _base.make_config(
      __file__,
      title="Sparse upcycling vs dense continued (1x, 1.5x steps) vs MoE from scratch (1x-4x "
            "steps), three parents",
      paper="Komatsuzaki et al., Sparse Upcycling (ICLR 2023), abstract, Fig. 1-2; Muennighoff "
            "et al., OLMoE (2024), Sec. 4",
      members=members,
      cpu=SAME_WIDTH_CPU, accelerator=SAME_WIDTH_ACCELERATOR,
      published=[
          {"claim": "upcycling beats continuing the dense model for the same extra steps",
           "source": "Sparse Upcycling abstract, Fig. 1", "published": not_read,
           "order": [i(upcycled), i(dense_continued)]},
          {"claim": "upcycling beats continuing the dense model at matched compute (dense "
                    "continued for 1.5x the steps)",
           "source": "Sparse Upcycling abstract (x-axis of its figures: extra compute)",
           "published": not_read, "order": [i(upcycled), i(dense_matched)]},
          {"claim": "upcycling beats an MoE from scratch given only the extra steps",
           "source": "Sparse Upcycling abstract (\"outperform sparse models trained from "
                     "scratch on 100% of the initial dense pretraining computation budget\")",
           "published": not_read, "order": [i(upcycled), i(scratch[0])]},
          {"claim": "the crossover: a from-scratch MoE with 4x the extra steps (2x the upcycled "
                    "model's parent + extra steps) beats the upcycled model",
           "source": "OLMoE Sec. 4 (from scratch catches up with upcycling given compute)",
           "published": not_read, "order": [i(scratch[3]), i(upcycled)]},
          {"claim": "a from-scratch MoE improves with more steps (1x .. 4x; true by construction: "
                    "mechanism check)", "mechanism": True, "kind": "trend",
           "source": "training longer", "order": [i(m) for m in reversed(scratch)]},
      ],
      notes=[f"Members reading {PARENT} start from the dense parent of their own seed (train "
             "them first: see the config's docstring); the others train from scratch.",
             "Dense continued for 1.5x the steps is the compute-matched dense baseline: the "
             "upcycled top-2 MoE does 1.44x (cpu) / 1.50x (accelerator) the dense model's "
             "training FLOPs per token.",
             "Where from-scratch catches up: compare the upcycled row with the scratch rows at "
             "1x .. 4x the extra steps."],
      smoke_members=(0, 1),
      seeds=SEEDS,
  )

"""Expert granularity at fixed total and active parameters: E:K = 4:1, 8:2, 16:4, 32:8, dropless.

F shrinks as E grows so that E*F (total expert parameters) and K*F (active) stay fixed.
OLMoE (Muennighoff et al. 2024) Section 4.1 "expert granularity" (8 top-1 vs 32 top-4 vs
64 top-8) and DeepSeekMoE (Dai et al. 2024, fine-grained expert segmentation): finer experts
reach lower loss, with diminishing returns. The papers' numbers were not read: the claim is
direction only (effect None).

Every member routes dropless (capacity_factor = eval_capacity_factor = None), as OLMoE trains:
with a capacity limit the gaps between granularities would be partly drop-rate gaps.

Run:  python launch.py --config=configs/ablations/granularity.py --workdir=runs/granularity
CPU time, measured 2026-12-01 on the 2-core CPU with the capacity table running alongside:
4 dropless members x 3 seeds = 12 runs of 1000 steps in 12 min 16 s (732 s of training);
results in experiments/ablation_results/granularity/.

Seeds from power (`python -m moe.sweep.power --workdir=runs/granularity` on the 3-seed run above;
experiments/ablation_results/POWER.md): 4.07 one-core minutes a seed, so 60 minutes on 2 cores
(`--sweep_shard=0/2` and `1/2` side by side) afford 29 seeds, 116 runs; projected from the measured
paired sd, the detectable trend falls from 0.0027 to 0.0005 nats per member step. The committed
results are still the 3-seed run.
"""

from configs.ablations import _base

SEEDS = 29  # seeds 0 .. 28, from power (docstring)

# F of the coarsest member (E=4); E*F = 4*F0 and K*F = F0 at every granularity.
F0 = {"cpu": 256, "accelerator": 2048}
DROPLESS = {"moe.capacity_factor": None, "moe.eval_capacity_factor": None}


def get_config():
  members = [{"moe.num_experts": e, "moe.num_selected": e // 4,
              "moe.expert_hidden": {s: f * 4 // e for s, f in F0.items()}, **DROPLESS}
             for e in (4, 8, 16, 32)]
  return _base.make_config(
      __file__,
      seeds=SEEDS,
      title="Expert granularity at equal total and active parameters (E:K = 4:1 .. 32:8), "
            "dropless",
      paper="Muennighoff et al., OLMoE (2024), Sec. 4.1 expert granularity; Dai et al., "
            "DeepSeekMoE (2024), fine-grained expert segmentation",
      members=members,
      # Unnormalized weights (OLMoE) at every granularity: renormalizing would give the top-1
      # member a constant weight of 1 and no router gradient from the language-model loss.
      common={"moe.renormalize": False},
      published=[
          {"claim": "finer-grained experts (more, smaller, more of them active) give lower loss",
           "source": "OLMoE Sec. 4.1 (expert granularity); DeepSeekMoE",
           "published": "not read (direction only)", "kind": "trend", "order": [3, 2, 1, 0]},
      ],
      notes=["Each member keeps E*F and K*F fixed (see F0 in the config file); the router "
             "and the dispatch grow with E, so tokens/s falls with granularity.",
             "Every member is dropless (as OLMoE): no gap here comes from dropped tokens."],
      smoke_members=(0, 3),
  )

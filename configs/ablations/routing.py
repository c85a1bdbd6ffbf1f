"""Routing variants at E=8, top-2: token choice dropless vs capacity 1.25 vs expert choice at
matched compute, and 1 shared + 7 routed experts (top-1) vs 8 routed experts (top-2), dropless,
equal active and total params.

OLMoE (Muennighoff et al. 2024) Sec. 4.1: dropless token choice beats expert choice, and a shared
expert does not help; DeepSeekMoE (Dai et al. 2024): isolating a shared expert helps;
MegaBlocks (Gale et al. 2023): dropless beats capacity-limited routing. None of these papers'
numbers were read (every claim here is direction only: "published" says "not read").

Expert choice at matched compute: each expert takes C = capacity_for(T, E, K, factor) tokens
(`moe.layer.routing.capacity_for`, the buffer a token-choice layer of the same config gets), so
with capacity factor 1.0 at training AND evaluation the E experts process E*C = K*T token
copies, exactly the K*T assignments of dropless token choice (T = 2048 tokens a group at `cpu`,
E = 8, K = 2: C = 512). tests/sweep/test_matched_designs.py checks the count.

NON-CAUSAL, NOT COMPARABLE: expert choice picks, for each expert, the top-C tokens of the whole
routing group, so a token's routing depends on later tokens: in a causal LM it leaks future
information and its eval loss is optimistic. There is no causal evaluation of expert choice
here, so its row and the claim that involves it are labelled "non-causal, not comparable". It
runs only because the member sets moe.allow_noncausal_routing=True.

The shared-expert pair is dropless (as OLMoE trains), so the comparison is not a drop-rate gap.

Run:  python launch.py --config=configs/ablations/routing.py --workdir=runs/routing
CPU time, measured 2026-12-01 on the 2-core CPU with the experts table running alongside:
4 members x 3 seeds = 12 runs of 1000 steps in 10 min 18 s (617 s of training); results in
experiments/ablation_results/routing/.

Seeds from power (`python -m moe.sweep.power --workdir=runs/routing` on the 3-seed run above;
experiments/ablation_results/POWER.md): 3.43 one-core minutes a seed, so 60 minutes on 2 cores
(`--sweep_shard=0/2` and `1/2` side by side) afford 34 seeds, 136 runs; projected from the measured
paired sd, the detectable effect falls from 0.019 / 0.033 / 0.064 nats (expert choice / capacity
1.25 / shared expert vs dropless) at 3 seeds to 0.004 / 0.006 / 0.012 at 34. The committed results
are still the 3-seed run.
"""

from configs.ablations import _base

SEEDS = 34  # seeds 0 .. 33, from power (docstring)

DROPLESS = {"moe.capacity_factor": None, "moe.eval_capacity_factor": None}


def get_config():
  dropless = dict(DROPLESS)
  capped = {"moe.capacity_factor": 1.25}
  # Matched compute: E*C = K*T at training and evaluation (factor 1.0 both).
  expert_choice = {"moe.router": "expert_choice", "moe.allow_noncausal_routing": True,
                   "moe.capacity_factor": 1.0, "moe.eval_capacity_factor": 1.0}
  shared = {"moe.num_experts": 7, "moe.num_selected": 1, "moe.num_shared_experts": 1,
            **DROPLESS}
  members = [dropless, capped, expert_choice, shared]
  i = members.index
  not_read = "not read (direction only)"
  return _base.make_config(
      __file__,
      seeds=SEEDS,
      title="Routing variants: token choice (dropless, capacity 1.25), expert choice at matched "
            "compute (non-causal, not comparable), shared expert (dropless)",
      paper="Muennighoff et al., OLMoE (2024), Sec. 4.1; Dai et al., DeepSeekMoE (2024); "
            "Gale et al., MegaBlocks (2023)",
      members=members,
      # Unnormalized weights (OLMoE, DeepSeekMoE) for every member: renormalizing would give
      # the shared member's single routed expert a constant weight of 1 and no router gradient.
      common={"moe.num_experts": 8, "moe.num_selected": 2, "moe.renormalize": False},
      published=[
          {"claim": "dropless token choice beats expert choice at matched compute "
                    "(expert choice here is non-causal, not comparable: it reads future tokens)",
           "source": "OLMoE Sec. 4.1", "published": not_read,
           "order": [i(dropless), i(expert_choice)]},
          {"claim": "dropless beats a capacity factor of 1.25", "source": "MegaBlocks",
           "published": not_read, "order": [i(dropless), i(capped)]},
          {"claim": "1 shared + 7 routed (top-1) beats 8 routed (top-2), both dropless",
           "source": "DeepSeekMoE (shared expert isolation)", "published": not_read,
           "order": [i(shared), i(dropless)]},
          {"claim": "8 routed (top-2) beats 1 shared + 7 routed (top-1), both dropless",
           "source": "OLMoE Sec. 4.1 (shared experts)", "published": not_read,
           "order": [i(dropless), i(shared)]},
      ],
      notes=["Expert choice (row expert-choice_*): NON-CAUSAL, NOT COMPARABLE. It reads future "
             "tokens of its routing group (leakage in a causal LM): its eval loss is optimistic "
             "and not a valid language-model loss. It needs moe.allow_noncausal_routing=True, "
             "set by that member. Its capacity factor is 1.0 at training and evaluation, so it "
             "does the K*T expert assignments of dropless token choice (matched compute).",
             "Orderings C (DeepSeekMoE) and D (OLMoE) contradict each other; at most one can "
             "hold."],
      smoke_members=(0, 2),
  )

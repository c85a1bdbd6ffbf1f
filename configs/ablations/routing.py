"""Routing variants at E=8, top-2: token choice dropless vs capacity 1.25 vs expert choice, and
1 shared + 7 routed experts (top-1) vs 8 routed experts (top-2), equal active and total params.

OLMoE (Muennighoff et al. 2024) Sec. 4.1: dropless token choice beats expert choice, and a shared
expert does not help; DeepSeekMoE (Dai et al. 2024): isolating a shared expert helps;
MegaBlocks (Gale et al. 2023): dropless beats capacity-limited routing.

CAVEAT: expert choice picks, for each expert, the top-C tokens of the whole routing group, so a
token's routing depends on later tokens: in a causal LM it leaks future information and its eval
loss is optimistic. It runs only because the member sets moe.allow_noncausal_routing=True.

Run:  python launch.py --config=configs/ablations/routing.py --workdir=runs/routing
CPU time, measured 2026-11-29 on the 2-core CPU with a second table running alongside:
4 members x 3 seeds = 12 runs of 1000 steps in 16 min 2 s.
"""

from configs.ablations import _base


def get_config():
  dropless = {"moe.capacity_factor": None, "moe.eval_capacity_factor": None}
  capped = {"moe.capacity_factor": 1.25}
  expert_choice = {"moe.router": "expert_choice", "moe.allow_noncausal_routing": True,
                   "moe.capacity_factor": 1.25}
  shared = {"moe.num_experts": 7, "moe.num_selected": 1, "moe.num_shared_experts": 1}
  members = [dropless, capped, expert_choice, shared]
  i = members.index
  return _base.make_config(
      __file__,
      title="Routing variants: token choice (dropless, capacity 1.25), expert choice, "
            "shared expert",
      paper="Muennighoff et al., OLMoE (2024), Sec. 4.1; Dai et al., DeepSeekMoE (2024); "
            "Gale et al., MegaBlocks (2023)",
      members=members,
      # Unnormalized weights (OLMoE, DeepSeekMoE) for every member: renormalizing would give
      # the shared member's single routed expert a constant weight of 1 and no router gradient.
      common={"moe.num_experts": 8, "moe.num_selected": 2, "moe.renormalize": False},
      published=[
          {"claim": "dropless token choice beats expert choice", "source": "OLMoE Sec. 4.1",
           "order": [i(dropless), i(expert_choice)]},
          {"claim": "dropless beats a capacity factor of 1.25", "source": "MegaBlocks",
           "order": [i(dropless), i(capped)]},
          {"claim": "1 shared + 7 routed (top-1) beats 8 routed (top-2)", "source": "DeepSeekMoE",
           "order": [i(shared), i(capped)]},
          {"claim": "8 routed (top-2) beats 1 shared + 7 routed (top-1)",
           "source": "OLMoE Sec. 4.1", "order": [i(capped), i(shared)]},
      ],
      notes=["Expert choice reads future tokens of its routing group (leakage in a causal LM): "
             "its eval loss is optimistic and not a valid language-model loss; compare it with "
             "care. It needs moe.allow_noncausal_routing=True, set by that member.",
             "Orderings C (DeepSeekMoE) and D (OLMoE) contradict each other; at most one can "
             "hold."],
      smoke_members=(0, 2),
  )

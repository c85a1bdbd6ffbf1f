"""Capacity factor x top-K: K in {1, 2} x train capacity factor {0.75, 1.0, 1.25, 2.0, dropless}.

Each member is evaluated at its own training capacity factor (the table's main columns) and,
as an extra evaluation of the finished checkpoint, at eval capacity factor 2.0.
Switch Transformer (Fedus et al. 2022) Table 1, ST-MoE (Zoph et al. 2022) Table 8: more capacity
(fewer dropped tokens) and top-2 routing improve quality per step, and a larger capacity factor at
evaluation helps; MegaBlocks (Gale et al. 2023): dropless beats capacity-limited routing.

Run:  python launch.py --config=configs/ablations/capacity.py --workdir=runs/capacity
CPU time, measured 2026-11-29 on the 2-core CPU with a second table running alongside:
10 members x 3 seeds = 30 runs of 800 steps plus 30 extra evaluations in 27 min 2 s (the
largest table, hence the shorter runs).
"""

from configs.ablations import _base

FACTORS = (0.75, 1.0, 1.25, 2.0, None)  # None = dropless


def get_config():
  members = _base.product(
      k=[{"moe.num_selected": k} for k in (1, 2)],
      cf=[{"moe.capacity_factor": cf, "moe.eval_capacity_factor": cf} for cf in FACTORS])
  idx = lambda k, cf: members.index(  # noqa: E731
      {"moe.num_selected": k, "moe.capacity_factor": cf, "moe.eval_capacity_factor": cf})
  by_quality = (None, 2.0, 1.25, 1.0, 0.75)
  return _base.make_config(
      __file__,
      title="Capacity factor x top-K (each evaluated at its train capacity factor and at 2.0)",
      paper="Fedus et al., Switch Transformers (2022), Table 1; Zoph et al., ST-MoE (2022), "
            "Table 8; Gale et al., MegaBlocks (2023) for dropless",
      members=members,
      # Unnormalized weights (Switch top-1) for both K: renormalizing one weight would make it 1
      # and leave the top-1 router without a language-model gradient.
      common={"moe.renormalize": False},
      cpu={"train.steps": 800, "train.eval_every": 400, "train.checkpoint_every": 400},
      eval_overrides=[{"name": "ecf2", "overrides": {"moe.eval_capacity_factor": 2.0}}],
      published=[
          {"claim": "top-1: more training capacity (fewer drops) gives lower loss; dropless best",
           "source": "Switch Table 1, ST-MoE Table 8, MegaBlocks",
           "order": [idx(1, cf) for cf in by_quality]},
          {"claim": "top-2: more training capacity gives lower loss; dropless best",
           "source": "ST-MoE Table 8, MegaBlocks", "order": [idx(2, cf) for cf in by_quality]},
          {"claim": "top-2 beats top-1 per step at capacity factor 1.25 (0.004 nats in ST-MoE: "
                    "expected to be within seed noise here)",
           "source": "Switch Table 1, ST-MoE Table 8", "order": [idx(2, 1.25), idx(1, 1.25)]},
          {"claim": "the dropped-assignment fraction falls as the capacity factor grows "
                    "(mechanism check)", "mechanism": True,
           "source": "definition of capacity (Switch Sec. 2.2)", "metric": "moe/dropped_fraction",
           "order": [idx(1, cf) for cf in (2.0, 1.25, 1.0, 0.75)]},
      ],
      notes=["Main columns: evaluated at the member's own capacity factor "
             "(eval_capacity_factor = capacity_factor). The '@ ecf2' column re-evaluates the same "
             "final checkpoint with eval_capacity_factor=2.0 (needs moe.train.trainer.evaluate)."],
      smoke_members=(3, 4),
  )

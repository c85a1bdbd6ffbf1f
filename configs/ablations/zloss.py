"""Router z-loss {0, 1e-3, 1e-2} x router dtype {float32, bfloat16}, plus high-learning-rate stress.

ST-MoE (Zoph et al. 2022) Table 4: the router z-loss makes training stable (every seed survives)
without hurting quality; Switch Transformer (Fedus et al. 2022) Table 2: a bfloat16 router
diverged where a float32 router ("selective precision") trained stably. The stress members train
at 10x the learning rate with gradient clipping off; the `stable seeds` metric counts the seeds
that completed rather than diverged.

Run:  python launch.py --config=configs/ablations/zloss.py --workdir=runs/zloss
CPU time, measured 2026-11-29 on the 2-core CPU with a second table running alongside:
9 members x 3 seeds = 27 runs of 1000 steps in 30 min 49 s (a diverged run would stop early;
none diverged).
"""

from configs.ablations import _base

STRESS = {"train.learning_rate": 3e-2, "train.grad_clip": 0.0}


def get_config():
  grid = _base.product(z=[{"moe.z_loss_weight": z} for z in (0.0, 1e-3, 1e-2)],
                       dtype=[{"moe.router_dtype": d} for d in ("float32", "bfloat16")])
  stress = [{"moe.z_loss_weight": 1e-3, "moe.router_dtype": "float32", **STRESS},
            {"moe.z_loss_weight": 0.0, "moe.router_dtype": "float32", **STRESS},
            {"moe.z_loss_weight": 0.0, "moe.router_dtype": "bfloat16", **STRESS}]
  members = grid + stress
  i = members.index
  g = lambda z, d: i({"moe.z_loss_weight": z, "moe.router_dtype": d})  # noqa: E731
  return _base.make_config(
      __file__,
      title="Router z-loss x router precision, and a high-learning-rate stability stress test",
      paper="Zoph et al., ST-MoE (2022), Table 4; Fedus et al., Switch Transformers (2022), "
            "Table 2",
      members=members,
      published=[
          {"claim": "with z-loss more seeds survive a high learning rate",
           "source": "ST-MoE Table 4", "metric": "stable_fraction", "higher_is_better": True,
           "order": [i(stress[0]), i(stress[1])]},
          {"claim": "a float32 router is more stable than a bfloat16 one",
           "source": "Switch Table 2", "metric": "stable_fraction", "higher_is_better": True,
           "order": [i(stress[1]), i(stress[2])]},
          {"claim": "z-loss 1e-3 does not hurt, and slightly improves, quality",
           "source": "ST-MoE Table 4", "order": [g(1e-3, "float32"), g(0.0, "float32")]},
          {"claim": "a float32 router reaches at least the quality of a bfloat16 one",
           "source": "Switch Table 2", "order": [g(1e-3, "float32"), g(1e-3, "bfloat16")]},
      ],
      notes=["Stress members: learning rate 3e-2 (10x the table's), gradient clipping off. "
             "'stable seeds' = fraction of finished seeds whose summary says completed rather "
             "than diverged.",
             "At this scale the normal-learning-rate members are expected to be stable whatever "
             "the settings; the published instabilities appeared in much larger models."],
      smoke_members=(6, 7),
  )

"""Shared pieces of the ablation tables in this folder (not a table itself: no get_config).

Every table is `configs/default.py` plus a `sweep` group (format: `moe/sweep/spec.py`). Two scales:

- `cpu`: a ~0.46M-parameter model (D=64, 2 blocks, L=128, 16 sequences a step, 1000 steps,
  16 validation batches). Every table, three seeds, ran on the 2-core CPU in 3 to 34 minutes
  (measured 2026-11-29 with two tables running side by side; each table's docstring and the
  README give its time). One 1000-step run took 49 to 110 s wall there. A table's seed count
  (`SEEDS` here: three, or the table's own) is chosen by `moe.sweep.power` from the paired
  spread its 3-seed run measured, to fill about 60 minutes
  (experiments/ablation_results/POWER.md).
- `accelerator`: D=512, 8 blocks, L=1024, 64 sequences a step, 20k steps: sizes worth a GPU/TPU.

Routing groups (`moe.group_size`): `cpu` keeps None, one group of each step's 2048 tokens on the
one CPU device, which is what the committed results in experiments/ablation_results/ measured (a
fixed size would change them); on more than one device that makes the routing mesh-dependent,
and the trainer warns. `accelerator` routes fixed groups of 4096 tokens, so a table gives the same
runs on 1, 2, 4, 8 or 16 devices.

A member override value may be {"cpu": x, "accelerator": y} when it depends on the scale.
"""

import os

import ml_collections

from configs import default

SEEDS = [0, 1, 2]

CPU = {
    "model.d_model": 64, "model.num_layers": 2, "model.num_heads": 2, "model.num_kv_heads": 2,
    "model.head_dim": 32, "model.d_ff": 256, "model.max_len": 128, "data.seq_len": 128,
    "moe.expert_hidden": 128,
    "moe.group_size": None,  # the committed tables: one group of the 2048-token batch (1 device)
    "train.batch_size": 16, "train.steps": 1000, "train.warmup_steps": 100, "train.log_every": 20,
    "train.eval_every": 500, "train.eval_batches": 16, "train.checkpoint_every": 500,
    "train.keep_checkpoints": 1,
}
ACCELERATOR = {
    "model.d_model": 512, "model.num_layers": 8, "model.num_heads": 8, "model.num_kv_heads": 8,
    "model.head_dim": 64, "model.d_ff": 2048, "model.max_len": 1024, "data.seq_len": 1024,
    "moe.expert_hidden": 1024,
    "moe.group_size": 4096,  # 4 sequences: the same routing on 1 to 16 devices
    "train.batch_size": 64, "train.steps": 20000, "train.warmup_steps": 1000,
    "train.learning_rate": 1e-3, "train.log_every": 50, "train.eval_every": 2000,
    "train.eval_batches": 32, "train.checkpoint_every": 1000, "train.keep_checkpoints": 2,
}


def product(**axes):
  """Cartesian product of axes given as {"name": [(path, value) or {path: value}, ...]}.

  product(k=[{"moe.num_selected": 1}, {"moe.num_selected": 2}],
          cf=[{"moe.capacity_factor": 1.0}, {"moe.capacity_factor": 2.0}])
  -> 4 override dicts, the first axis varying slowest.
  """
  out = [{}]
  for options in axes.values():
    out = [{**o, **opt} for o in out for opt in options]
  return out


def make_config(file: str, *, title: str, paper: str, members: list, published: list,
                metric: str = "eval_cross_entropy", higher_is_better: bool = False,
                common: dict | None = None, cpu: dict | None = None,
                accelerator: dict | None = None, eval_overrides: list | None = None,
                notes: list | None = None, smoke_members=(0, 1), seeds: int | None = None):
  """The default config plus a `sweep` group; `common` applies at both scales. `seeds`: the
  table's seed count (seeds 0 .. seeds-1; None = SEEDS), chosen by `moe.sweep.power`."""
  c = default.get_config()
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  s = ml_collections.ConfigDict()
  s.title = title
  s.paper = paper
  s.config_file = os.path.relpath(os.path.abspath(file), root)
  s.metric = metric
  s.higher_is_better = higher_is_better
  s.members = [dict(m) for m in members]
  s.seeds = list(SEEDS) if seeds is None else list(range(seeds))
  s.scale = "cpu"
  s.scales = [
      {"name": "cpu", "overrides": {**CPU, **(common or {}), **(cpu or {})}},
      {"name": "accelerator",
       "overrides": {**ACCELERATOR, **(common or {}), **(accelerator or {})}},
  ]
  s.eval_overrides = list(eval_overrides or [])
  s.published = [dict(p) for p in published]
  s.notes = list(notes or [])
  s.smoke = False
  s.smoke_members = list(smoke_members)
  c.sweep = s
  return c

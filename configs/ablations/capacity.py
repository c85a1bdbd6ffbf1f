"""Capacity factor x top-K: K in {1, 2} x train capacity factor {0.75, 1.0, 1.25, 2.0, dropless},
plus top-2 at matched FLOPs (experts half as wide) at capacity 1.25 and dropless.

Each member is evaluated at its own training capacity factor (the table's main columns) and,
as an extra evaluation of the finished checkpoint, at eval capacity factor 2.0.

What the papers report (the numbers are in each claim's "published" field):
- Switch Transformer (Fedus et al., JMLR 2022) Table 1, negative log perplexity after 100k steps
  (higher is better): top-1 (Switch-Base) -1.561 / -1.553 / -1.554 and top-2 (MoE-Base, the
  same experts, so about twice the expert FLOPs) -1.572 / -1.559 / -1.547 at capacity factor
  1.0 / 1.25 / 2.0. Top-1 gains from 1.0 to 1.25 and nothing from 1.25 to 2.0; top-2 gains at
  every step; top-1 is *ahead* of top-2 at 1.0 and 1.25, behind at 2.0. Switch-Base+ (top-1,
  larger, speed-matched to MoE-Base) reaches -1.534.
- ST-MoE (Zoph et al. 2022) Table 8: evaluating a top-1 model at capacity factor 2.0 instead of
  its training factor gains +0.024 / +0.013 / +0.005 at train factor 0.75 / 1.0 / 1.25: the
  lower the training capacity, the more the larger evaluation capacity helps.
- MegaBlocks (Gale et al. 2023): dropless routing beats capacity-limited routing (direction
  only here: the paper's numbers were not read).

Matched designs: members k2_* with the default expert width are parameter-matched to top-1 (the
Switch Table 1 design, twice the active expert FLOPs); members k2_*_f<F/2> halve
moe.expert_hidden so that top-2 does the active expert FLOPs of top-1 (K*F fixed).

Run:  python launch.py --config=configs/ablations/capacity.py --workdir=runs/capacity
CPU time, measured 2026-12-01 on the 2-core CPU with the granularity table running alongside
for its first 12 minutes: 12 members x 3 seeds = 36 runs of 800 steps plus 36 extra evaluations
in 19 min 41 s (1148 s of training); results in experiments/ablation_results/capacity/.

Seeds from power (`python -m moe.sweep.power --workdir=runs/capacity` on the 3-seed run above;
experiments/ablation_results/POWER.md): 6.38 one-core minutes a seed, so 60 minutes on 2 cores
(`--sweep_shard=0/2` and `1/2` side by side) afford 18 seeds, 216 runs; projected from the measured
paired sd, the detectable effects fall by a factor of about 3.7 (e.g. top-1 vs top-2 at 1.25:
0.0052 -> 0.0014 nats; Switch Table 1's 0.008 gap of top-1 at 1.25 over 1.0 would need 54 seeds at
the measured sd 0.023, so it stays not testable). Re-run at 18 seeds on 2026-12-01 (two shards,
`--workdir=runs/capacity_s22`): 216 runs in 62 min 58 s (7395 s of training); the measured sd
at 18 seeds was smaller than at 3, so claim A became testable (detectable 0.0072 < 0.008).
Results in experiments/ablation_results/capacity/.
"""

from configs.ablations import _base

SEEDS = 18  # seeds 0 .. 17, from power (docstring)

FACTORS = (0.75, 1.0, 1.25, 2.0, None)  # None = dropless
# F/2 for the FLOP-matched top-2 members (K*F equal to top-1's F).
HALF_WIDTH = {"cpu": _base.CPU["moe.expert_hidden"] // 2,
              "accelerator": _base.ACCELERATOR["moe.expert_hidden"] // 2}


def _member(k, cf, **extra):
  return {"moe.num_selected": k, "moe.capacity_factor": cf, "moe.eval_capacity_factor": cf,
          **extra}


def get_config():
  members = _base.product(
      k=[{"moe.num_selected": k} for k in (1, 2)],
      cf=[{"moe.capacity_factor": cf, "moe.eval_capacity_factor": cf} for cf in FACTORS])
  flop_matched = [_member(2, cf, **{"moe.expert_hidden": HALF_WIDTH}) for cf in (1.25, None)]
  members += flop_matched
  idx = lambda k, cf: members.index(_member(k, cf))  # noqa: E731
  half = lambda cf: members.index(_member(2, cf, **{"moe.expert_hidden": HALF_WIDTH}))  # noqa: E731
  return _base.make_config(
      __file__,
      seeds=SEEDS,
      title="Capacity factor x top-K (each evaluated at its train capacity factor and at 2.0); "
            "top-2 parameter-matched and FLOP-matched",
      paper="Fedus et al., Switch Transformers (JMLR 2022), Table 1; Zoph et al., ST-MoE (2022), "
            "Table 8; Gale et al., MegaBlocks (2023) for dropless",
      members=members,
      # Unnormalized weights (Switch top-1) for both K: renormalizing one weight would make it 1
      # and leave the top-1 router without a language-model gradient.
      common={"moe.renormalize": False},
      cpu={"train.steps": 800, "train.eval_every": 400, "train.checkpoint_every": 400},
      eval_overrides=[{"name": "ecf2", "overrides": {"moe.eval_capacity_factor": 2.0}}],
      published=_claims(idx, half),
      notes=["Main columns: evaluated at the member's own capacity factor "
             "(eval_capacity_factor = capacity_factor). The '@ ecf2' column re-evaluates the same "
             "final checkpoint with eval_capacity_factor=2.0 (needs moe.train.trainer.evaluate).",
             "k2 members with the default expert width have twice the active expert FLOPs of k1 "
             "(parameter-matched, as Switch Table 1's MoE-Base); members ending in _f<F/2> halve "
             "moe.expert_hidden (FLOP-matched: K*F equal to top-1's F).",
             "Published effects are Switch/ST-MoE negative log perplexities (nats per token) of "
             "T5-Base-size models on C4 span corruption; here they are compared with the "
             "eval cross-entropy (nats per byte) of a 0.46M-parameter byte-level LM."],
      smoke_members=(2, 10),  # top-1 vs FLOP-matched top-2 at 1.25: one claim survives
  )


def _claims(idx, half) -> list:
  switch_t1 = ("Switch Table 1 (neg. log perplexity at 100k steps): top-1 -1.561 / -1.553 / "
               "-1.554, top-2 -1.572 / -1.559 / -1.547 at capacity factor 1.0 / 1.25 / 2.0")
  return [
      {"claim": "top-1: capacity factor 1.25 beats 1.0", "source": "Switch Table 1",
       "published": switch_t1, "effect": 0.008, "order": [idx(1, 1.25), idx(1, 1.0)]},
      {"claim": "top-1: capacity factor 1.25 is no worse than 2.0 (Switch's top-1 does not "
                "improve from 1.25 to 2.0); margin 0.01 nats is this table's choice",
       "source": "Switch Table 1", "published": switch_t1, "kind": "no_worse",
       "margin": 0.01, "effect": 0.001, "order": [idx(1, 1.25), idx(1, 2.0)]},
      {"claim": "top-2 (parameter-matched): more training capacity gives lower loss, "
                "capacity factor 2.0 > 1.25 > 1.0",
       "source": "Switch Table 1", "published": switch_t1, "kind": "trend",
       "effect": 0.0125, "order": [idx(2, 2.0), idx(2, 1.25), idx(2, 1.0)]},
      {"claim": "top-1 beats parameter-matched top-2 at capacity factor 1.25",
       "source": "Switch Table 1", "published": switch_t1, "effect": 0.006,
       "order": [idx(1, 1.25), idx(2, 1.25)]},
      {"claim": "parameter-matched top-2 beats top-1 at capacity factor 2.0",
       "source": "Switch Table 1", "published": switch_t1, "effect": 0.007,
       "order": [idx(2, 2.0), idx(1, 2.0)]},
      {"claim": "at equal active compute top-1 beats top-2 (here: top-2 with experts half as "
                "wide, capacity factor 1.25)",
       "source": "Switch Table 1, Switch-Base+ (top-1, larger, speed-matched to MoE-Base, "
                 "not FLOP-matched)",
       "published": "Switch-Base+ -1.534 at capacity factor 1.0 vs MoE-Base (top-2) -1.547 at "
                    "2.0; no FLOP-matched top-2 was published, so no effect size",
       "order": [idx(1, 1.25), half(1.25)]},
      {"claim": "evaluating at capacity factor 2.0 helps more the lower the training capacity "
                "(top-1, train factor 0.75 > 1.0 > 1.25)",
       "source": "ST-MoE Table 8",
       "published": "top-1, eval factor 2.0 vs eval factor = train factor: +0.024 / +0.013 / "
                    "+0.005 neg. log perplexity at train factor 0.75 / 1.0 / 1.25",
       "kind": "trend", "metric": "eval_cross_entropy - eval_cross_entropy@ecf2",
       "higher_is_better": True, "effect": 0.0095,
       "order": [idx(1, 0.75), idx(1, 1.0), idx(1, 1.25)]},
      {"claim": "top-1: dropless beats capacity factor 1.0", "source": "MegaBlocks",
       "published": "not read (direction only)", "order": [idx(1, None), idx(1, 1.0)]},
      {"claim": "the dropped-assignment fraction falls as the capacity factor grows "
                "(mechanism check)", "mechanism": True,
       "source": "definition of capacity (Switch Sec. 2.2)", "metric": "moe/dropped_fraction",
       "order": [idx(1, cf) for cf in (2.0, 1.25, 1.0, 0.75)]},
  ]

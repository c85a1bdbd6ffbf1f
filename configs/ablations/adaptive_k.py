"""Fixed k vs adaptive k (top-p routing) at matched average compute.

Huang et al., "Harder Tasks Need More Experts: Dynamic Routing in MoE Models" (ACL 2024),
abstract: top-p routing (a token takes experts in order of router probability until their
cumulative probability exceeds p) beats top-2 routing by 0.7% average accuracy over their
downstream tasks while activating under 90% of top-2's parameters (their tables were not read:
the effect is in accuracy points, not nats, so the claims here are directions only). Jin et al.,
"Sparsity-Controllable Dynamic Top-p MoE for Large Foundation Model Pre-training" (arXiv
2512.13996), abstract: a threshold steered to a target number of active experts (a PI controller
there, a sign controller here: docs/semantics.md, "Adaptive k") beats both top-k at matched
average FLOPs and fixed-threshold top-p (numbers not read).

Members (`_base` cpu scale, E = 8, every member dropless so that a member's expert compute is its
mean k exactly; the combine weights are the raw router probabilities (`moe.renormalize=False`),
as in Huang et al.'s code, for every member alike, so top-1 keeps its router gradient):
- fixed k: top-1 and top-2;
- top-p (`moe.k_rule=top_p`, at most 4 experts a token): thresholds 0.36 and 0.52, chosen from
  one-seed pilots (2026-12-01, same settings, 1000 steps) that ended at a mean k of 1.47 at
  p = 0.35 and 1.93 at p = 0.50, so near 1.5 and 2;
- sparsity-controlled top-p (`moe.k_rule=top_p_target`, at most 4): target mean k 1.5 and 2,
  the threshold starting at the top-p member's value and moving 1e-3 a step.

Matched compute is checked, not assumed: the table's `mean k (train)` column (the last logging
window) and `eval_moe/mean_k` in runs.csv give each member's mean k; a fixed top-p member's k
drifts as its router sharpens (it takes more experts early in training, when the router is
near uniform), which is what the controlled variant corrects.

Per-layer and per-token-kind mean k: `python experiments/adaptive_k_breakdown.py
--workdir=runs/adaptive_k` (after the table) runs `--mode=analyze` on seed 0 of every member and
writes `k_breakdown.md` beside the report.

Run:  python launch.py --config=configs/ablations/adaptive_k.py --workdir=runs/adaptive_k
CPU time, measured 2026-12-01 on the 2-core CPU: seeds 0-2 as two shards (`--sweep_shard=0/2`
and `1/2`) while two other tables ran, four runs sharing the 2 cores, 18 runs in 21 min 27 s;
then seeds 3-7 (the same command with SEEDS = 8: finished runs are skipped) as two shards alone,
30 runs in 12 min 19 s; 48 runs, 3822 s of training in all. Results in
experiments/ablation_results/adaptive_k/ (with k_breakdown.md, seed 0: 49 s for the six
analyses).

Seeds from power (`python -m moe.sweep.power --workdir=runs/adaptive_k` on the 3-seed run;
experiments/ablation_results/POWER.md): 13.5 minutes of run wall time a seed measured at about
half a core per run, so 8 seeds (48 runs) was a conservative count for 60 minutes on 2 cores
(alone, seeds 3-7 took 2.5 minutes of wall time a seed). The committed results are the 8-seed
run.
"""

from configs.ablations import _base

DROPLESS = {"moe.capacity_factor": None, "moe.eval_capacity_factor": None,
            "moe.renormalize": False}
P_LOW, P_HIGH = 0.36, 0.52  # top-p thresholds near mean k 1.5 and 2 (pilots: docstring)
K_MAX = 4
SEEDS = 8  # seeds 0 .. 7, from power (docstring)


def get_config():
  top1, top2 = ({"moe.num_selected": k} for k in (1, 2))
  topp = [{"moe.k_rule": "top_p", "moe.num_selected": K_MAX, "moe.top_p": p}
          for p in (P_LOW, P_HIGH)]
  ctl = [{"moe.k_rule": "top_p_target", "moe.num_selected": K_MAX, "moe.target_k": k,
          "moe.top_p": p} for k, p in ((1.5, P_LOW), (2.0, P_HIGH))]
  members = [top1, top2] + topp + ctl
  i = members.index
  huang = ("Huang et al. 2024, abstract: +0.7% average accuracy over top-2 with < 90% of its "
           "activated parameters (accuracy, not loss; tables not read)")
  jin = "Jin et al. 2025 (arXiv 2512.13996), abstract (numbers not read)"
  return _base.make_config(
      __file__,
      title="Fixed k vs adaptive k (top-p, and top-p steered to a target mean k) at matched "
            "average compute, dropless",
      paper="Huang et al., Harder Tasks Need More Experts (ACL 2024); Jin et al., "
            "Sparsity-Controllable Dynamic Top-p MoE (arXiv 2512.13996)",
      members=members,
      common=DROPLESS,
      published=[
          {"claim": "top-p routing at about top-2's compute beats top-2",
           "source": "Huang et al. 2024, abstract", "published": huang,
           "order": [i(topp[1]), i(top2)]},
          {"claim": "top-p steered to mean k 2 beats top-2 at matched average FLOPs",
           "source": "Jin et al. 2025, abstract", "published": jin,
           "order": [i(ctl[1]), i(top2)]},
          {"claim": "top-p steered to mean k 2 beats a fixed threshold at about the same k",
           "source": "Jin et al. 2025, abstract", "published": jin,
           "order": [i(ctl[1]), i(topp[1])]},
          {"claim": "top-p steered to mean k 1.5 beats a fixed threshold at about the same k",
           "source": "Jin et al. 2025, abstract", "published": jin,
           "order": [i(ctl[0]), i(topp[0])]},
          {"claim": "more experts per token, lower loss: top-2 beats top-1",
           "source": "mechanism check", "mechanism": True, "order": [i(top2), i(top1)]},
          {"claim": "loss falls as the target mean k rises (1 < 1.5 < 2, the controlled "
                    "member between top-1 and top-2)", "source": "mechanism check",
           "mechanism": True, "kind": "trend", "order": [i(top2), i(ctl[0]), i(top1)]},
      ],
      notes=["Every member dropless, combine weights = raw router probabilities "
             "(moe.renormalize=False), E = 8; adaptive members take 1 to 4 experts a token.",
             "Matched compute: compare the 'mean k (train)' column (and eval_moe/mean_k in "
             "runs.csv) with the members' targets; a fixed threshold's k drifts during training.",
             "Per layer and per kind of token: k_breakdown.md (experiments/"
             "adaptive_k_breakdown.py)."],
      smoke_members=(1, 4),
      seeds=SEEDS,
  )

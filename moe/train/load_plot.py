"""`load.png`: each MoE layer's load per expert over training, one heatmap per layer.

Read from the `moe/layer_<i>/load` lists of a run's metrics.jsonl (mean fraction of assignments
per expert over each logging window, `moe.train.metrics`): rows are experts, columns the logged
steps, colour the load relative to the uniform 1/E (1 = balanced). The trainer writes it at the
end of a run; `write_load_plot(workdir)` redraws it for any run folder.
"""

from __future__ import annotations

import re

import numpy as np

from moe import rundir
from moe.rundir import LOAD_PLOT_FILE, METRICS_FILE, read_metrics, replacing

_LOAD_KEY = re.compile(r"^moe/layer_(\d+)/load$")


def load_history(records: list[dict]) -> tuple[list[int], dict[int, np.ndarray]]:
  """(logged steps, {layer index: load [steps, E]}) of the records holding a load list."""
  steps, rows = [], {}
  for r in records:
    loads = {int(m.group(1)): v for k, v in r.items() if (m := _LOAD_KEY.match(k))}
    if not loads:
      continue
    steps.append(int(r["step"]))
    for layer, v in loads.items():
      rows.setdefault(layer, []).append(np.asarray(v, np.float64))
  return steps, {layer: np.stack(v) for layer, v in sorted(rows.items())
                 if len(v) == len(steps)}


def write_load_plot(workdir: str) -> str | None:
  """Draws `workdir/load.png` from `workdir/metrics.jsonl`; returns its path, or None when the
  run logged no MoE load (a dense model, or no record yet)."""
  path = rundir.join(workdir, METRICS_FILE)  # local or remote, like the whole run folder
  if not rundir.exists(path):
    return None
  steps, loads = load_history(read_metrics(path))
  if not loads:
    return None
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  n = len(loads)
  fig, axes = plt.subplots(n, 1, figsize=(8, 1.2 + 1.6 * n), squeeze=False)
  for ax, (layer, load_SE) in zip(axes[:, 0], loads.items()):
    num_experts = load_SE.shape[1]
    image = ax.imshow((load_SE * num_experts).T, aspect="auto", cmap="viridis",
                      interpolation="nearest", origin="lower")
    ax.set_title(f"layer {layer}: load x E (1 = balanced)", fontsize=9)
    ax.set_ylabel("expert")
    ticks = np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int)
    ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
    fig.colorbar(image, ax=ax, fraction=0.03)
  axes[-1, 0].set_xlabel("step")
  fig.tight_layout()
  out = rundir.join(workdir, LOAD_PLOT_FILE)
  try:
    with replacing(out) as tmp:  # readers never see half a file
      fig.savefig(tmp, dpi=100)
  finally:
    plt.close(fig)
  return out

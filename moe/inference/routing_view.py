"""A picture of the routing of one text: tokens coloured by their top-1 expert, one row per layer.

`write_routing_map(workdir, texts, layers, num_experts, prompt_len)` writes

- `routing_map.html`: for each MoE layer a line of the text, every token on the background colour
  of its top-1 expert (hover: all chosen experts and weights); prompt tokens are underlined; then
  a table of each expert's share of the assignments per layer;
- `routing_map.png` (matplotlib): a grid, layers x tokens, coloured by top-1 expert, with the
  token texts along the x axis and a colour legend of the experts;
- `routing_load.json`: {layer: {"load": [E fractions], "top1_load": [E fractions]}} for the text.

`layers` is [(name, {"expert_index": [N, K], "combine_weights": [N, K], "slot": [N, K]})] as
captured by `moe.inference.generate`; the top-1 expert of a token is its kept choice with the
largest combine weight (-1 when every choice was dropped, drawn grey).
"""

from __future__ import annotations

import html

import numpy as np

from moe import rundir

HTML_FILE, PNG_FILE, LOAD_FILE = "routing_map.html", "routing_map.png", "routing_load.json"


def top1(d: dict) -> tuple[np.ndarray, np.ndarray]:
  """([N] top-1 expert (-1 = all dropped), [N] its weight) from one layer's routing."""
  w = np.where(np.asarray(d["slot"]) >= 0, np.asarray(d["combine_weights"], np.float64), -1.0)
  k = np.argmax(w, axis=-1)
  idx = np.take_along_axis(np.asarray(d["expert_index"]), k[:, None], -1)[:, 0]
  best = np.take_along_axis(w, k[:, None], -1)[:, 0]
  return np.where(best >= 0, idx, -1), np.maximum(best, 0.0)


def expert_load(d: dict, num_experts: int) -> tuple[list, list]:
  """(share of kept assignments per expert, share of tokens whose top-1 is that expert)."""
  kept = np.asarray(d["slot"]) >= 0
  counts = np.bincount(np.asarray(d["expert_index"])[kept], minlength=num_experts)
  t1, _ = top1(d)
  t1c = np.bincount(t1[t1 >= 0], minlength=num_experts)
  return ((counts / max(counts.sum(), 1)).tolist(), (t1c / max(t1c.sum(), 1)).tolist())


def _colors(num_experts: int) -> list[str]:
  import matplotlib  # only when a picture is drawn (import time)
  cmap = matplotlib.colormaps["tab20" if num_experts > 10 else "tab10"]
  out = []
  for e in range(num_experts):
    r, g, b, _ = cmap(e % cmap.N)
    out.append(f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}")
  return out


def _shown(text: str) -> str:
  """Token text as drawn: newline and tab as arrows, other control characters escaped."""
  text = text.replace("\n", "\u21b5").replace("\t", "\u2192")
  text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
  return text or "\u2205"


def write_html(path: str, texts: list[str], layers: list, num_experts: int, prompt_len: int,
               loads: dict) -> None:
  colors = _colors(num_experts)
  rows = []
  for name, d in layers:
    t1, _ = top1(d)
    spans = []
    for i, text in enumerate(texts):
      chosen = ", ".join(
          f"e{int(d['expert_index'][i, k])} {float(d['combine_weights'][i, k]):.2f}"
          + ("" if d["slot"][i, k] >= 0 else " dropped") for k in range(d["slot"].shape[-1]))
      bg = colors[t1[i]] if t1[i] >= 0 else "#cccccc"
      style = f"background:{bg};" + ("text-decoration:underline;" if i < prompt_len else "")
      spans.append(f'<span class="t" style="{style}" title="{html.escape(chosen)}">'
                   f"{html.escape(_shown(text))}</span>")
    rows.append(f"<h3>{html.escape(name)}</h3><div class='line'>{''.join(spans)}</div>")
  legend = "".join(f'<span class="t" style="background:{c}">expert {e}</span> '
                   for e, c in enumerate(colors))
  head = "".join(f"<th>e{e}</th>" for e in range(num_experts))
  table = [f"<tr><th>layer</th><th>share</th>{head}</tr>"]
  for name, ld in loads.items():
    for key, label in (("load", "assignments"), ("top1_load", "top-1")):
      cells = "".join(f"<td>{v:.3f}</td>" for v in ld[key])
      table.append(f"<tr><td>{html.escape(name)}</td><td>{label}</td>{cells}</tr>")
  doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>routing map</title>
<style>body{{font-family:sans-serif}} .line{{font-family:monospace;white-space:pre-wrap;
line-height:1.8}} .t{{padding:1px 0;border-radius:2px}} td,th{{padding:2px 6px;
text-align:right}}</style></head><body>
<h2>Routing map: each token on the colour of its top-1 expert</h2>
<p>{len(texts)} tokens ({prompt_len} prompt tokens, underlined). Hover a token for all its
chosen experts and weights. Legend: {legend}</p>
{''.join(rows)}
<h2>Expert load over this text</h2><table>{''.join(table)}</table></body></html>
"""
  rundir.write_text_atomic(path, doc)


def write_png(path: str, texts: list[str], layers: list, num_experts: int,
              prompt_len: int) -> None:
  # matplotlib only when a picture is drawn: import time, and the Agg backend is chosen here,
  # not for whoever imports this module.
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.colors import ListedColormap
  from matplotlib.patches import Patch

  colors = ["#cccccc"] + _colors(num_experts)
  grid = np.stack([top1(d)[0] + 1 for _, d in layers])  # 0 = all dropped
  n = len(texts)
  fig, ax = plt.subplots(figsize=(min(2 + 0.28 * n, 60), 1.2 + 0.5 * len(layers)))
  ax.imshow(grid, cmap=ListedColormap(colors), vmin=0, vmax=num_experts, aspect="auto",
            interpolation="nearest")
  ax.set_yticks(range(len(layers)), [name for name, _ in layers])
  ax.set_xticks(range(n), [_shown(t) for t in texts], rotation=90, fontsize=7,
                fontfamily="monospace")
  if 0 < prompt_len < n:
    ax.axvline(prompt_len - 0.5, color="black", linewidth=1.5)
  handles = [Patch(color=colors[e + 1], label=f"e{e}") for e in range(num_experts)]
  ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7,
            ncol=1 + num_experts // 16)
  ax.set_title("top-1 expert per token and layer (line: end of prompt)", fontsize=9)
  fig.tight_layout()
  with rundir.replacing(path) as tmp:  # keeps .png: matplotlib picks the format from it
    fig.savefig(tmp, dpi=100)
  plt.close(fig)


def write_routing_map(workdir: str, texts: list[str], layers: list, *, num_experts: int,
                      prompt_len: int = 0) -> dict[str, str]:
  """Writes the HTML map, the PNG grid and the per-expert load into `workdir`; returns paths."""
  if not layers:
    raise ValueError("write_routing_map: no MoE layer routing to draw")
  for name, d in layers:
    if np.asarray(d["expert_index"]).shape[0] != len(texts):
      raise ValueError(f"write_routing_map: layer {name} has routing for "
                       f"{np.asarray(d['expert_index']).shape[0]} tokens, the text {len(texts)}")
  rundir.makedirs(workdir)
  loads = {}
  for name, d in layers:
    load, t1 = expert_load(d, num_experts)
    loads[name] = {"load": load, "top1_load": t1}
  paths = {"html": rundir.join(workdir, HTML_FILE), "png": rundir.join(workdir, PNG_FILE),
           "load": rundir.join(workdir, LOAD_FILE)}
  write_html(paths["html"], texts, layers, num_experts, prompt_len, loads)
  write_png(paths["png"], texts, layers, num_experts, prompt_len)
  rundir.write_json_atomic(paths["load"], {"tokens": len(texts), "prompt_tokens": prompt_len,
                                           "layers": loads}, indent=1, default=None)
  return paths

r"""Peak host memory of `python -m moe.convert` importing and exporting a bfloat16 Mixtral.

  python experiments/convert_memory.py [--out=/tmp/convert_memory] [--layers=4 --d_model=1024 ...]

Writes a random bfloat16 Mixtral (config.json + model.safetensors, written with the
`safetensors` package directly, no PyTorch; about 300 MB with the defaults) into `--out`, then
runs the import (`--from_hf=... --to=...`) and the export (`--from=... --to_hf=...`) each
`--repeat` times in a fresh process and prints the range of their peak resident memory (the
child's VmHWM, see `peak_mb`), next to the baseline of a process that only imports the
converter, the model's size and its largest tensor, and the checkpoint's size on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_model(folder: str, *, layers: int, d_model: int, experts: int, hidden: int, vocab: int,
                heads: int, kv_heads: int) -> tuple[int, int]:
  """A random bfloat16 Mixtral in `folder`; returns (bytes, largest tensor's bytes)."""
  from safetensors.numpy import save_file
  head_dim = d_model // heads
  shapes = {"model.embed_tokens.weight": (vocab, d_model), "model.norm.weight": (d_model,),
            "lm_head.weight": (vocab, d_model)}
  for i in range(layers):
    b = f"model.layers.{i}."
    shapes.update({b + "input_layernorm.weight": (d_model,),
                   b + "post_attention_layernorm.weight": (d_model,),
                   b + "self_attn.q_proj.weight": (heads * head_dim, d_model),
                   b + "self_attn.k_proj.weight": (kv_heads * head_dim, d_model),
                   b + "self_attn.v_proj.weight": (kv_heads * head_dim, d_model),
                   b + "self_attn.o_proj.weight": (d_model, heads * head_dim),
                   b + "block_sparse_moe.gate.weight": (experts, d_model)})
    for e in range(experts):
      m = f"{b}block_sparse_moe.experts.{e}."
      shapes.update({m + "w1.weight": (hidden, d_model), m + "w3.weight": (hidden, d_model),
                     m + "w2.weight": (d_model, hidden)})
  rng = np.random.default_rng(0)
  tensors = {n: (0.02 * rng.standard_normal(s, dtype=np.float32)).astype(ml_dtypes.bfloat16)
             for n, s in shapes.items()}
  os.makedirs(folder, exist_ok=True)
  save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
  config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "vocab_size": vocab, "hidden_size": d_model, "intermediate_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": head_dim, "hidden_act": "silu",
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
            "num_local_experts": experts, "num_experts_per_tok": 2,
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
            "dtype": "bfloat16"}
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f)
  sizes = [t.nbytes for t in tensors.values()]
  return sum(sizes), max(sizes)


def peak_mb(args: list[str], ok=(0,), repo: str = REPO) -> tuple[float, float]:
  """(peak RSS in MB, seconds) of `python args...` run in the repository as a child process.

  The peak is the child's VmHWM (/proc/self/status): its own address space's high-water mark.
  Not ru_maxrss: Linux carries the parent's resident size at the fork into the child's
  ru_maxrss across exec, so this script's own memory (the model it wrote) would be a floor."""
  script = ("import resource, runpy, sys; sys.argv = sys.argv[1:]; "
            "code = 0\ntry:\n  runpy.run_module(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as e:\n  code = e.code or 0\n"
            "kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n  kb = [int(l.split()[1]) for l in open('/proc/self/status') "
            "if l.startswith('VmHWM:')][0]\nexcept (OSError, IndexError):\n  pass\n"
            "print('MAXRSS_KB', kb, file=sys.stderr)\nsys.exit(code)")
  start = time.perf_counter()
  r = subprocess.run([sys.executable, "-c", script] + args, cwd=repo, capture_output=True,
                     text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  secs = time.perf_counter() - start
  if r.returncode not in ok:
    raise SystemExit(f"{' '.join(args)} failed:\n{r.stderr[-2000:]}")
  kb = [line for line in r.stderr.splitlines() if line.startswith("MAXRSS_KB")][-1]
  return int(kb.split()[1]) / 1024, secs


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="/tmp/convert_memory")
  p.add_argument("--repo", default=REPO, help="the checkout whose moe.convert is measured")
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--d_model", type=int, default=1024)
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--hidden", type=int, default=1280)
  p.add_argument("--vocab", type=int, default=8000)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv_heads", type=int, default=2)
  p.add_argument("--repeat", type=int, default=3, help="runs of each command (peaks vary)")
  a = p.parse_args()
  shutil.rmtree(a.out, ignore_errors=True)
  hf, ours, back = (os.path.join(a.out, n) for n in ("hf", "ours", "back"))
  total, largest = write_model(hf, layers=a.layers, d_model=a.d_model, experts=a.experts,
                               hidden=a.hidden, vocab=a.vocab, heads=a.heads,
                               kv_heads=a.kv_heads)
  print(f"model: {total / 2**20:.0f} MB bfloat16 on disk, largest tensor "
        f"{largest / 2**20:.1f} MB")
  base, _ = peak_mb(["moe.convert"], ok=(2,), repo=a.repo)  # imports everything, converts nothing
  print(f"baseline (python -m moe.convert without flags): peak RSS {base:.0f} MB")
  print(f"baseline + model + its largest tensor: "
        f"{base + (total + largest) / 2**20:.0f} MB")

  def report(what, runs, extra=""):
    peaks = sorted(r for r, _ in runs)
    print(f"{what}: peak RSS {peaks[0]:.0f}-{peaks[-1]:.0f} MB ({peaks[0] - base:+.0f} to "
          f"{peaks[-1] - base:+.0f} MB over baseline) in {len(runs)} runs, "
          f"{min(s for _, s in runs):.1f} s{extra}")

  runs = []
  for _ in range(a.repeat):
    shutil.rmtree(ours, ignore_errors=True)
    runs.append(peak_mb(["moe.convert", f"--from_hf={hf}", f"--to={ours}"], repo=a.repo))
  disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(ours,
             "checkpoints")) for f in fs)
  report("import", runs, f", checkpoint {disk / 2**20:.0f} MB on disk")
  runs = []
  for _ in range(a.repeat):
    runs.append(peak_mb(["moe.convert", f"--from={ours}", f"--to_hf={back}",
                         f"--config={os.path.join(ours, 'config.py')}"], repo=a.repo))
  size = os.path.getsize(os.path.join(back, "model.safetensors"))
  report("export", runs, f", model.safetensors {size / 2**20:.0f} MB")

if __name__ == "__main__":
  main()

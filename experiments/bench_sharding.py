"""Expert parallelism on 8 simulated CPU devices: one line per mesh with the train-step time and
the bytes the compiled step moves through each kind of collective (read from the HLO).

    python experiments/bench_sharding.py            # the five meshes, capacity and dropless
    python experiments/bench_sharding.py --quick    # fewer steps, smoke test

The script forces 8 host-platform devices (XLA_FLAGS) before JAX starts. It builds the real
model (`moe.model.transformer.Transformer`) and the real train step (`moe.train.step.make_train_step`, AdamW,
the MoE losses), places the state by `moe.sharding.LOGICAL_RULES`, compiles the step under
`moe.sharding.activate(mesh)` and times it on a fixed random batch. "all-to-all bytes" is the sum
of the result sizes of the step's all-to-all instructions on one device (the bytes that device
sends, its own share included); the other columns likewise for all-gather / all-reduce /
reduce-scatter / collective-permute. The results go to the "Expert parallelism (8 simulated CPU
devices)" section of BENCHMARKS.md (only that section is rewritten).

The 8 "devices" are threads of one process sharing the machine's cores (os.cpu_count()): step
times say how much work each layout costs in total here, not how it would scale on 8 real chips.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

from bench_common import ROOT, command_line, loadavg, machine, versions, write_section
import hlo as hlo_lib

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

sys.path.insert(0, ROOT)
SECTION = "## Expert parallelism (8 simulated CPU devices)"
MESHES = [(8, 1, 1, 1), (2, 1, 4, 1), (1, 2, 4, 1), (2, 1, 2, 2), (1, 1, 8, 1)]
# A small model that still makes the experts the bulk of the parameters.
MODEL = dict(vocab_size=256, d_model=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16,
             d_ff=256, max_len=128)
MOE = dict(num_experts=8, num_selected=2, expert_hidden=128, min_capacity=1)
B, L = 16, 128


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="2 timed steps per mesh: a smoke run")
  p.add_argument("--steps", type=int, default=None, help="timed steps per mesh (default 8)")
  p.add_argument("--output", default=os.path.join(ROOT, "BENCHMARKS.md"),
                 help="markdown file whose section is rewritten ('' to skip)")
  return p.parse_args(argv)


def build(shape, capacity_factor):
  """(compiled step, state, batch, hlo text, params) for one mesh and routing.

  `params` are the initialized parameters before the step runs (the compiled step donates the
  state, so read any shard of them before calling it).
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np
  from moe import sharding
  from moe.train import step as step_lib
  from moe.model.config import ModelConfig
  from moe.layer.config import MoeConfig
  from moe.model.transformer import Transformer

  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, shape))))
  tokens_per_device = B // (shape[0] * shape[1] * shape[2]) * L
  moe_cfg = MoeConfig(**MOE, capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor,
                      group_size=min(tokens_per_device, 256))
  cfg = ModelConfig(**MODEL, moe=moe_cfg)
  model = Transformer(cfg)
  tc = ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_steps=10, steps=1000,
                                      min_lr_ratio=0.1, grad_clip=1.0, b1=0.9, b2=0.95,
                                      weight_decay=0.1, trainable="all"))
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((B, L), jnp.int32)))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh,
                                          sharding.LOGICAL_RULES)
  abstract_params = nn.unbox(boxed)["params"]
  tx, frozen, schedule = step_lib.make_optimizer(tc, abstract_params)
  rep = sharding.replicated(mesh)
  batch_sh = sharding.logical_sharding(mesh, ("batch", "length"))
  rng = np.random.default_rng(0)
  toks = rng.integers(0, MODEL["vocab_size"], (B, L + 1)).astype(np.int32)
  batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
           "segment_ids": np.ones((B, L), np.int32),
           "positions": np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy(),
           "loss_mask": np.ones((B, L), np.float32), "target_bytes": np.ones((B, L), np.float32)}
  batch = {k: jax.device_put(v, batch_sh) for k, v in batch.items()}
  variables = jax.jit(lambda r: nn.unbox(model.init(r, batch["inputs"])),
                      out_shardings=nn.unbox(shardings))(jax.random.key(0))
  params = variables["params"]
  # The optimizer state mirrors the params' shardings, exactly as the trainer lays it out.
  from moe.train.trainer import _opt_shardings
  _, opt_sh = _opt_shardings(tx, jax.tree.map(
      lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=p.sharding), params),
      jax.tree.map(lambda p: p.sharding, params), mesh)
  with sharding.activate(mesh):
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    state = {"step": jax.device_put(jnp.zeros((), jnp.int32), rep), "params": params,
             "opt_state": opt_state, "moe_bias": variables.get("moe_bias", {}),
             "rng": jax.device_put(jax.random.PRNGKey(1), rep)}
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    step = jax.jit(step_lib.make_train_step(model, tx, frozen, schedule),
                   in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                   donate_argnums=(0,))
    compiled = step.lower(state, batch).compile()
  return compiled, state, batch, compiled.as_text(), params


def measure(shape, capacity_factor, steps):
  import jax
  t0 = time.perf_counter()
  compiled, state, batch, hlo, params = build(shape, capacity_factor)
  compile_s = time.perf_counter() - t0
  w_in = params["block_0"]["moe"]["experts"]["w_in"]
  expert_shard = tuple(w_in.addressable_shards[0].data.shape)  # before the step donates it
  del params, w_in
  state, m = compiled(state, batch)  # warm-up
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  by_op = {}
  for c in hlo_lib.hlo_collectives(hlo):
    by_op[c["op"]] = by_op.get(c["op"], 0) + c["bytes"]
  return {"mesh": shape, "dropless": capacity_factor is None,
          "step_ms": 1000 * statistics.median(times), "min_ms": 1000 * min(times),
          "compile_s": compile_s, "bytes": by_op,
          "n_a2a": sum(1 for c in hlo_lib.hlo_collectives(hlo) if c["op"] == "all-to-all"),
          "expert_shard": expert_shard,
          "loss": float(m["loss"])}


def fmt_bytes(n):
  if not n:
    return "0"
  return f"{n / 1024:.0f} KiB" if n < 1024 ** 2 else f"{n / 1024 ** 2:.2f} MiB"


def render(rows, meta):
  out = [SECTION, "",
         f"Measured {meta['date']} on {meta['machine']}; {meta['versions']}. Command: "
         f"`{meta['command']}`. Load average before/after: {meta['load'][0]} / {meta['load'][1]}.",
         "",
         "**The 8 devices are simulated** (`--xla_force_host_platform_device_count=8`): threads of "
         f"one process sharing the machine's {meta['cpus']} cores. Step times therefore measure "
         "the total work of each layout here (collectives are memory copies), not how it scales "
         "on 8 real chips; the byte counts are exact properties of the compiled program and carry "
         "over.", "",
         f"One train step (forward, backward, AdamW) of the real model: D={MODEL['d_model']}, "
         f"{MODEL['num_layers']} MoE blocks, E={MOE['num_experts']}, K={MOE['num_selected']}, "
         f"F={MOE['expert_hidden']}, batch {B} x {L} tokens, f32; routing groups of min(tokens per "
         f"device, 256); capacity factor 1.25 or dropless (static bound C = T per group, see "
         f"`moe/layer/expert_parallel.py`). Median of {meta['steps']} steps after one warm-up. Bytes: "
         f"per device per step, summed result sizes of the compiled step's collectives "
         f"(`hlo_collectives` in `experiments/hlo.py`). 'expert shard' = one device's `w_in` block "
         f"[E/expert, D/fsdp, F/tensor].", "",
         "| mesh (data, fsdp, expert, tensor) | routing | step ms | all-to-all | # a2a | "
         "all-gather | all-reduce | other | expert shard | compile s |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    b = r["bytes"]
    other = sum(v for k, v in b.items() if k not in ("all-to-all", "all-gather", "all-reduce"))
    out.append(f"| {r['mesh']} | {'dropless' if r['dropless'] else 'cf 1.25'} | "
               f"{r['step_ms']:.0f} | {fmt_bytes(b.get('all-to-all', 0))} | {r['n_a2a']} | "
               f"{fmt_bytes(b.get('all-gather', 0))} | {fmt_bytes(b.get('all-reduce', 0))} | "
               f"{fmt_bytes(other)} | {list(r['expert_shard'])} | {r['compile_s']:.0f} |")
  out += ["", "Reading: (8,1,1,1) is pure data parallelism (no all-to-all; every device holds all "
          "experts and the gradients are all-reduced). With expert > 1 each MoE layer adds four "
          "all-to-alls per step (tokens out and back, forward and backward), each the size of one "
          "device's [E, G*C, D] buffer; dropless sends C = T rows per (expert, group), E/K = "
          f"{MOE['num_experts'] // MOE['num_selected']} times the assignments, plus the occupancy "
          "masks. fsdp > 1 adds the all-gathers of the E/expert local experts' weights; "
          "tensor > 1 adds the all-reduce of the expert outputs over F.", ""]
  return "\n".join(out)


def main(argv=None):
  args = parse_args(argv)
  import jax
  assert jax.device_count() == 8, jax.devices()
  steps = args.steps or (2 if args.quick else 8)
  load_before = loadavg()
  rows = []
  for dropless in (False, True):
    for shape in MESHES:
      r = measure(shape, None if dropless else 1.25, steps)
      rows.append(r)
      print(f"{shape} {'dropless' if dropless else 'cf1.25'}: {r['step_ms']:.0f} ms/step, "
            f"a2a {r['bytes'].get('all-to-all', 0)} B, {r['bytes']}, loss {r['loss']:.4f}",
            flush=True)
  meta = {"date": datetime.date.today().isoformat(), "machine": machine(),
          "cpus": os.cpu_count(), "versions": versions(), "command": command_line(),
          "load": (load_before, loadavg()), "steps": steps}
  text = render(rows, meta)
  print(text)
  if args.output:
    write_section(args.output, SECTION, text)


if __name__ == "__main__":
  main()

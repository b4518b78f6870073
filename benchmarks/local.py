"""2-D neighborhood attention vs dense attention on CPU: fwd+bwd time and compiled temp memory.

    python -m benchmarks.local [--grid 64,64] [--kernels 7,13] [--heads 4] [--head-dim 32]
                               [--repeats 3] [--rounds 2] [--out results/bench/local.json]

Issue 16: 2-D NA on 64 x 64 tokens, head_dim 32, kernel 7 and 13, forward + backward (gradients
of q, k, v for a fixed random cotangent), against dense attention over all ``N = 4096`` tokens
(``aj.attention``, ``impl="auto"``, no mask).  Rows: ``dense``, ``na_gather`` and ``na_tiled``
(the two fast forms of :func:`attn_jax.local.neighborhood`).  Every row of one kernel size is
timed in the same process in alternating rounds (median of the pooled runs after a warm-up,
``block_until_ready``); wall time and process CPU time (all threads) are both recorded, since
the 2-core machine is shared.  Memory: XLA's compiled ``temp_size_in_bytes`` of each fwd+bwd
program.  The FLOP-sparsity bound is ``N / prod(kernel)`` (dense scores ``N^2``, NA ``N k^2``):
the speedup NA would have if time followed the score FLOPs.  Target: within 2x of that bound for
``k = 7``.  Writes ``results/bench/local.json``.
"""

from __future__ import annotations

import argparse
import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np

import attn_jax as aj
from attn_jax.core import masks as M
from attn_jax.local.neighborhood import NeighborhoodMask, neighborhood_spec, tiled_order
from benchmarks import common

B = 1


def _fwd_bwd(fn):
    """``(q, k, v, ct) -> (dq, dk, dv)`` of ``sum(fn(q, k, v) * ct)``, jitted."""
    def loss(q, k, v, ct):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * ct)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def run(grid, kernels, H: int, Dh: int, repeats: int, rounds: int) -> dict:
    N = math.prod(grid)
    rng = np.random.default_rng(0)
    q, k, v, ct = (jnp.asarray(rng.standard_normal((B, *grid, H, Dh)), jnp.float32) for _ in range(4))
    flat = lambda x: x.reshape(B, N, H, Dh)  # noqa: E731
    rows = []
    for ks in kernels:
        spec = neighborhood_spec(grid, ks)
        fns = {
            "dense": _fwd_bwd(lambda q, k, v: aj.attention(flat(q), flat(k), flat(v)).reshape(q.shape)),
            "na_gather": _fwd_bwd(lambda q, k, v, ks=ks: aj.local.neighborhood(q, k, v, ks, impl="gather")),
            "na_tiled": _fwd_bwd(lambda q, k, v, ks=ks: aj.local.neighborhood(q, k, v, ks, impl="tiled")),
        }
        args = (q, k, v, ct)
        mem = {n: common.compiled_memory(f, *common.abstract(*args))["temp_bytes"] for n, f in fns.items()}
        wall = {n: [] for n in fns}
        cpu = {n: [] for n in fns}
        for _ in range(rounds):
            for n, f in fns.items():
                t = common.time_call(f, *args, repeats=repeats)
                wall[n] += t["times_s"]
                cpu[n] += t["cpu_times_s"]
        block, bs = tiled_order(spec)
        cls = NeighborhoodMask(spec, block).classify(N, N, bs, bs)
        bound = N / spec.window
        row = {"kernel_size": ks, "window_tokens": spec.window, "density": spec.window / N,
               "flop_sparsity_bound": bound,
               "tiled": {"order": "raster" if block is None else f"blocks {block}", "tile": bs,
                         "tiles_visited": int((cls != M.EMPTY).sum()), "tiles_total": int(cls.size),
                         "work_over_needed": float((cls != M.EMPTY).sum()) * bs * bs / (N * spec.window)}}
        for n in fns:
            row[n] = {"wall_median_s": statistics.median(wall[n]), "wall_min_s": min(wall[n]),
                      "cpu_median_s": statistics.median(cpu[n]), "temp_bytes": mem[n], "wall_s": wall[n],
                      "cpu_s": cpu[n]}
        for n in ("na_gather", "na_tiled"):
            row[n]["speedup_wall"] = row["dense"]["wall_median_s"] / row[n]["wall_median_s"]
            row[n]["speedup_cpu"] = row["dense"]["cpu_median_s"] / row[n]["cpu_median_s"]
            row[n]["speedup_over_bound"] = row[n]["speedup_wall"] / bound
            row[n]["temp_memory_ratio"] = mem[n] / max(mem["dense"], 1)
        rows.append(row)
    return {"grid": list(grid), "batch": B, "heads": H, "head_dim": Dh, "dtype": "float32", "repeats": repeats,
            "rounds": rounds, "rows": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="64,64")
    ap.add_argument("--kernels", default="7,13")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    grid = tuple(int(x) for x in a.grid.split(","))
    kernels = [int(x) for x in a.kernels.split(",")]
    env = common.environment()
    res = run(grid, kernels, a.heads, a.head_dim, a.repeats, a.rounds)
    res["environment"] = env
    res["load_average_at_end"] = list(__import__("os").getloadavg())
    res["command"] = "python -m benchmarks.local " + " ".join(argv or __import__("sys").argv[1:])
    table = []
    for r in res["rows"]:
        for n in ("dense", "na_gather", "na_tiled"):
            x = r[n]
            table.append([r["kernel_size"], n, common.fmt_time(x["wall_median_s"]), common.fmt_time(x["cpu_median_s"]),
                          common.fmt_bytes(x["temp_bytes"]),
                          f"{x['speedup_wall']:.1f}x" if "speedup_wall" in x else "-",
                          f"{x['speedup_cpu']:.1f}x" if "speedup_cpu" in x else "-",
                          f"{r['flop_sparsity_bound']:.1f}x",
                          f"{x['temp_memory_ratio']:.3f}" if "temp_memory_ratio" in x else "-"])
    print(common.format_table(["k", "impl", "wall", "cpu", "temp mem", "speedup(wall)", "speedup(cpu)",
                               "FLOP bound", "mem ratio"], table))
    out = a.out or f"{common.results_dir()}/local.json"
    common.write_json(out, res)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Relative embeddings (Music Transformer, causal, one row per distance): three ways to the same logits.

``python -m benchmarks.relative [--seq-lens 2048,8192] [--repeats 3] [--run-budget-gib 2]``

* ``fused``: ``aj.attention(q, k, v, bias=RelativeEmbedding(E, causal=True), mask=causal(), impl="xla")``:
  ``q · E`` skewed per tile inside the tiled path, no ``T x S`` array;
* ``skewed_dense``: Huang et al.'s skew over the whole sequence (``relative_logits_skewed``: ``q Eᵀ``
  ``[T, T]``, spread to ``[T, 2T - 1]`` and skewed), then passed as a dense ``[1, H, T, T]`` bias to
  ``aj.attention`` (auto);
* ``gathered``: the ``[T, T, H, D]`` gather of ``relative_logits_gathered`` (the reference form).

B=1, H=8, D=64, float32, ``E: [T, H, D]``.  Forward and forward+backward (gradients of q, k, v, E).
Memory is XLA's compiled analysis (compiling allocates nothing, so it is reported at every size);
a variant is *run* only when its compiled temp + argument bytes fit ``--run-budget-gib`` (the
machine is shared).  Times: median / min wall time and median process CPU time (all threads) of
``--repeats`` runs after one warm-up, peers alternating.  Writes ``results/bench/relative.json``.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp

import attn_jax as aj
from attn_jax import masks
from attn_jax.positional.relative import RelativeEmbedding, relative_logits_gathered, relative_logits_skewed
from benchmarks import common

B, H, D = 1, 8, 64


def _variants():
    scale = D ** -0.5

    def fused(q, k, v, e):
        return aj.attention(q, k, v, bias=RelativeEmbedding(e, causal=True), mask=masks.causal(), impl="xla")

    def skewed_dense(q, k, v, e):
        bias = scale * relative_logits_skewed(q, e, S=k.shape[1], causal=True)
        return aj.attention(q, k, v, bias=bias, mask=masks.causal())

    def gathered(q, k, v, e):
        bias = scale * relative_logits_gathered(q, e, S=k.shape[1], causal=True)
        return aj.attention(q, k, v, bias=bias, mask=masks.causal())

    return {"fused": fused, "skewed_dense": skewed_dense, "gathered": gathered}


def _with_grad(fwd):
    def f(q, k, v, e, c):
        return jax.grad(lambda *a: jnp.sum(fwd(*a) * c), argnums=(0, 1, 2, 3))(q, k, v, e)

    return f


def run(seq_lens, repeats: int, budget_bytes: int) -> dict:
    rows = []
    for T in seq_lens:
        ks = jax.random.split(jax.random.key(T), 5)
        q, k, v = (jax.random.normal(kk, (B, T, H, D), jnp.float32) for kk in ks[:3])
        e = 0.1 * jax.random.normal(ks[3], (T, H, D), jnp.float32)
        c = jax.random.normal(ks[4], (B, T, H, D), jnp.float32)
        for mode in ("fwd", "fwd+bwd"):
            runnable = {}
            for name, fwd in _variants().items():
                fn, args = (fwd, (q, k, v, e)) if mode == "fwd" else (_with_grad(fwd), (q, k, v, e, c))
                mem = common.compiled_memory(fn, *common.abstract(*args))
                row = {"variant": name, "mode": mode, "T": T, **mem, "median_s": None, "min_s": None,
                       "cpu_median_s": None}
                if mem["temp_bytes"] + mem["argument_bytes"] <= budget_bytes:
                    runnable[name] = (jax.jit(fn), args, row)
                else:
                    need = common.fmt_bytes(mem["temp_bytes"] + mem["argument_bytes"])
                    row["skipped"] = (f"compiled temp + arguments {need} exceed the run budget "
                                      f"{common.fmt_bytes(budget_bytes)}")
                rows.append(row)
            for name, (fn, args, row) in runnable.items():
                t = common.time_call(fn, *args, repeats=repeats)
                row.update({k: t[k] for k in ("median_s", "min_s", "cpu_median_s", "times_s")})
            for row in rows[-3:]:
                print(f"T={T:5d} {mode:7s} {row['variant']:12s} wall {common.fmt_time(row['median_s']):>11s} "
                      f"(min {common.fmt_time(row['min_s'])}) cpu {common.fmt_time(row['cpu_median_s']):>11s}  "
                      f"temp {common.fmt_bytes(row['temp_bytes']):>10s}", flush=True)
    return {"benchmark": "relative", "config": {"B": B, "H": H, "D": D, "dtype": "float32", "causal": True,
                                                "table_rows": "T (Music Transformer: one row per distance)",
                                                "repeats": repeats, "run_budget_bytes": budget_bytes},
            "environment": common.environment(), "rows": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", default="2048,8192")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--run-budget-gib", type=float, default=2.0)
    p.add_argument("--out", default=os.path.join(common.results_dir(), "relative.json"))
    a = p.parse_args(argv)
    payload = run([int(t) for t in a.seq_lens.split(",")], a.repeats, int(a.run_budget_gib * (1 << 30)))
    payload["environment"]["load_average_at_end"] = os.getloadavg()
    common.write_json(a.out, payload)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

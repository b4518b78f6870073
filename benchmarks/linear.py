"""Linear attention on CPU: chunk vs parallel vs scan forms vs exact softmax, at fixed tokens per batch.

    python -m benchmarks.linear [--tokens 16384] [--seq-lens 512,...,16384] [--repeats 5] [--quick]

Lightning attention's claim (Qin et al. 2024, arXiv:2401.04658 / 2405.17381): with a fixed
number of tokens per batch, training speed stays constant as the sequence length grows.  For
each ``T`` the batch is ``B = tokens / T`` sequences of ``H=4`` heads, ``D=64``, float32, and we
time forward+backward (gradient of ``sum(o * c)`` w.r.t. q, k, v) of

* ``chunk``: ``aj.linear.lightning_attention`` (scalar per-head decay), chunkwise form;
* ``parallel``: the same function, materialised quadratic form (``impl="parallel"``);
* ``scan``: the same function, token-by-token ``lax.scan`` (``impl="reference"``);
* ``gla_chunk``: ``aj.linear.gla`` with vector gates, chunkwise form (secondary chunking);
* ``softmax``: exact causal attention, ``aj.attention(impl="xla")`` (the chunked flash path).

Median of ``--repeats`` runs after a warm-up (``block_until_ready``); tokens/s = tokens / median.
A run is skipped (and marked) when XLA's compiled footprint exceeds 70% of free RAM or the
previous length's time extrapolated (x4.5 for quadratic forms, x2.2 otherwise) exceeds
``--max-seconds``.  Writes ``results/bench/linear.{json,png}``.  Targets (issue #7): chunk
tokens/s flat within 25% from T=1k to T=16k; chunk >= 10x faster than parallel at T=16k; the
crossover T where chunk overtakes exact softmax.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp

import attn_jax as aj
from attn_jax import linear, masks
from benchmarks import common

H, D = 4, 64
QUADRATIC = {"parallel", "softmax"}


def _inputs(B: int, T: int):
    ks = jax.random.split(jax.random.key(0), 5)
    q, k, v, c = (jax.random.normal(kk, (B, T, H, D), jnp.float32) * 0.5 for kk in ks[:4])
    g = jax.nn.log_sigmoid(jax.random.normal(ks[4], (B, T, H, D), jnp.float32) + 3.0) / 16.0
    return q, k, v, c, g


def forms():
    lightning = lambda impl: (lambda q, k, v, g: linear.lightning_attention(q, k, v, impl=impl)[0])
    return {
        "chunk": lightning("chunk"),
        "parallel": lightning("parallel"),
        "scan": lightning("reference"),
        "gla_chunk": lambda q, k, v, g: linear.gla(q, k, v, g, impl="chunk")[0],
        "softmax": lambda q, k, v, g: aj.attention(q, k, v, mask=masks.causal(), impl="xla"),
    }


def fwd_bwd(fwd):
    def f(q, k, v, g, c):
        return jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v, g) * c), argnums=(0, 1, 2))(q, k, v)

    return jax.jit(f)


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--seq-lens", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--forms", default="chunk,parallel,scan,gla_chunk,softmax")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-seconds", type=float, default=60.0)
    ap.add_argument("--quick", action="store_true", help="T in {512, 1024}, 2 repeats, no plot")
    ap.add_argument("--out", default=os.path.join(common.results_dir(), "linear"))
    args = ap.parse_args(argv)
    seq_lens = [512, 1024] if args.quick else [int(s) for s in args.seq_lens.split(",")]
    repeats = 2 if args.quick else args.repeats
    names = args.forms.split(",")
    impls = forms()
    print(f"linear attention, fwd+bwd, {args.tokens} tokens per batch, H={H} D={D} float32 "
          f"on {jax.default_backend()} ({os.cpu_count()} cores)")
    rows, prev = [], {}
    for T in seq_lens:
        if args.tokens % T:
            raise SystemExit(f"--tokens {args.tokens} is not a multiple of T={T}")
        B = args.tokens // T
        q, k, v, c, g = _inputs(B, T)
        for name in names:
            fn = fwd_bwd(impls[name])
            row = {"form": name, "T": T, "B": B, "median_s": None, "tokens_per_s": None, "skipped": None}
            mem = common.compiled_memory(fn, *common.abstract(q, k, v, g, c))
            row["temp_bytes"] = mem["temp_bytes"]
            growth = 4.5 if name in QUADRATIC else 2.2
            ram = _ram_bytes()
            if mem["temp_bytes"] > 0.7 * ram:
                row["skipped"] = f"needs {common.fmt_bytes(mem['temp_bytes'])} > 70% of free RAM {common.fmt_bytes(ram)}"
            elif name in prev and prev[name] * growth > args.max_seconds:
                row["skipped"] = f"predicted {prev[name] * growth:.0f} s per run > {args.max_seconds:.0f} s"
            else:
                t = common.time_call(fn, q, k, v, g, c, repeats=repeats)
                row.update(median_s=t["median_s"], times_s=t["times_s"], tokens_per_s=args.tokens / t["median_s"])
                prev[name] = t["median_s"]
            rows.append(row)
            print(f"T={T:6d} B={B:3d} {name:10s} "
                  + (f"{row['median_s'] * 1e3:9.1f} ms  {row['tokens_per_s']:10.0f} tok/s" if row["median_s"] else
                     f"[skipped: {row['skipped']}]")
                  + f"  temp {common.fmt_bytes(row['temp_bytes'])}", flush=True)
    table, summary = _summarise(rows, seq_lens, names)
    print("\n" + table + "\n")
    for line in summary["verdicts"]:
        print(line)
    payload = {"environment": common.environment(), "config": {"tokens": args.tokens, "H": H, "D": D,
               "dtype": "float32", "repeats": repeats}, "rows": rows, "summary": summary}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    common.write_json(args.out + ".json", payload)
    print(f"\nwrote {args.out}.json")
    if not args.quick:
        _plot(rows, seq_lens, names, args.out + ".png")
        print(f"wrote {args.out}.png")
    return payload


def _get(rows, form, T, key="tokens_per_s"):
    for r in rows:
        if r["form"] == form and r["T"] == T:
            return r.get(key)
    return None


def _summarise(rows, seq_lens, names):
    header = ["T", *names, "chunk/parallel speed", "chunk/softmax speed"]
    out = []
    for T in seq_lens:
        tps = {n: _get(rows, n, T) for n in names}
        ratio = lambda a, b: "-" if a is None or b is None else f"{a / b:.2f}x"
        out.append([T, *("skipped" if tps[n] is None else f"{tps[n]:.0f}" for n in names),
                    ratio(tps.get("chunk"), tps.get("parallel")), ratio(tps.get("chunk"), tps.get("softmax"))])
    verdicts, summary = [], {}
    flat = [(T, _get(rows, "chunk", T)) for T in seq_lens if T >= 1024 and _get(rows, "chunk", T)]
    if flat:
        hi, lo = max(t for _, t in flat), min(t for _, t in flat)
        spread = (hi - lo) / hi
        summary["chunk_spread_1k_plus"] = spread
        verdicts.append(f"chunk tokens/s from T={flat[0][0]} to T={flat[-1][0]}: min/max = {lo / hi:.2f} "
                        f"(spread {spread:.0%}; target <= 25%) -> {'MET' if spread <= 0.25 else 'MISSED'}")
    T_max = max(seq_lens)
    c, p = _get(rows, "chunk", T_max), _get(rows, "parallel", T_max)
    if c and p:
        summary["chunk_over_parallel_at_max_T"] = c / p
        verdicts.append(f"chunk vs parallel at T={T_max}: {c / p:.1f}x faster (target >= 10x) -> "
                        f"{'MET' if c / p >= 10 else 'MISSED'}")
    elif c and "parallel" in names:
        verdicts.append(f"parallel at T={T_max} was skipped ({_get(rows, 'parallel', T_max, 'skipped')})")
    cross = None
    for T in seq_lens:
        c, s = _get(rows, "chunk", T), _get(rows, "softmax", T)
        if c and s and c > s:
            cross = T
            break
    summary["crossover_T_chunk_beats_softmax"] = cross
    verdicts.append("crossover: chunk linear attention is faster than exact softmax (xla) from T="
                    + (str(cross) if cross else "never in the measured range"))
    summary["verdicts"] = verdicts
    return common.format_table(header, out), summary


def _plot(rows, seq_lens, names, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n in names:
        pts = [(T, _get(rows, n, T)) for T in seq_lens if _get(rows, n, T)]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=n)
    ax.set(xscale="log", yscale="log", xlabel="sequence length T (tokens per batch fixed)",
           ylabel="fwd+bwd tokens/s", title="linear attention forms vs exact softmax (CPU)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

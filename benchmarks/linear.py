"""Linear attention on CPU: chunk vs parallel vs scan forms vs exact softmax, at fixed tokens per batch.

    python -m benchmarks.linear [--tokens 16384] [--seq-lens 512,...,16384] [--forms chunk,parallel,...]
                                [--parallel-mode auto|batched|per_head] [--repeats 5] [--quick]
                                [--merge [--merge-forms parallel]]  # update rows of the existing JSON

Lightning attention's claim (Qin et al. 2024, arXiv:2401.04658 / 2405.17381): with a fixed
number of tokens per batch, training speed stays constant as the sequence length grows.  For
each ``T`` the batch is ``B = tokens / T`` sequences of ``H=4`` heads, ``D=64``, float32, and we
time forward+backward (gradient of ``sum(o * c)`` w.r.t. q, k, v) of

* ``chunk``: ``aj.linear.lightning_attention`` (scalar per-head decay), chunkwise form;
* ``parallel``: the same function, materialised quadratic form (``impl="parallel"``), run one of
  two ways (``--parallel-mode``; the row's ``method`` field says which):

  - ``batched``: one ``jax.jit(grad)`` over all ``B * H`` heads, like the other forms;
  - ``per_head``: ``lax.map`` over the ``H`` heads inside one jitted function, each iteration the
    forward *and* backward of ``lightning_attention(q_h, k_h, v_h, decays=[λ_h], impl="parallel")``
    on one head (``[B, T, 1, D]``).  Heads are independent and the loss is a sum over heads, so
    this computes exactly the same gradients with the same FLOPs (no rematerialisation); only
    one head's ``[T, T]`` score/decay matrices and their backward temporaries are live at a
    time (the batched form holds all ``H`` at once: ~20 GiB at T=16k);
  - ``auto`` (default): ``batched`` when its compiled footprint fits the memory budget, else
    ``per_head``.  So the default run measures T=16k per head (compiled temp 5.3 GiB instead of
    20.0 GiB batched) and every shorter T batched (T=8k: 6.0 GiB).

  Per head is not free on this CPU: it was 1.7-2.8x slower than batched at T=2k, 4k and 8k
  (interleaved in one process, loaded machine), so the T=16k parallel time overstates what a
  batched run with enough memory would take, and the chunk/parallel ratio at 16k is an upper
  bound (dividing it by ~2.5 estimates the batched ratio).  When a run times both chunk
  and parallel at one T, the parallel row keeps the chunk time of that run (``same_run_chunk``)
  and the ratios use it.
* ``scan``: the same function, token-by-token ``lax.scan`` (``impl="reference"``);
* ``gla_chunk``: ``aj.linear.gla`` with vector gates, chunkwise form (secondary chunking);
* ``softmax``: exact causal attention, ``aj.attention(impl="xla")`` (the chunked flash path).

Median of ``--repeats`` runs after a warm-up (``block_until_ready``); tokens/s = tokens / median.
A run is skipped (and marked) when XLA's compiled footprint (``memory_analysis().temp_size``)
exceeds the budget ``min(70% of free RAM, --max-temp-gib)`` or the previous length's time
extrapolated (x4.5 for quadratic forms, x2.2 otherwise) exceeds ``--max-seconds``.  Writes
``results/bench/linear.{json,png}``; with ``--merge`` the measured ``(form, T)`` rows (of
``--merge-forms``, default all) replace or extend those of the existing JSON (every row records
its run's time, load and repeats).  The T=16k parallel row of ``results/bench/linear.json`` comes
from a ``--seq-lens 8192,16384 --forms chunk,parallel`` run on a loaded machine, merged with only
that row (what ``--merge --merge-forms parallel`` does; see the row's ``run`` record).
Targets (issue #7): chunk tokens/s flat within 25% from T=1k to T=16k; chunk >= 10x faster than
parallel at T=16k; the crossover T where chunk overtakes exact softmax.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax

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


def parallel_per_head_fwd_bwd():
    """The ``parallel`` form's fwd+bwd evaluated head by head (``lax.map`` over H; see the docstring).

    Same inputs and outputs as ``fwd_bwd(forms()["parallel"])``: ``(dq, dk, dv)`` of
    ``sum(lightning_attention(q, k, v, impl="parallel")[0] * c)``.
    """
    lam = jnp.asarray(linear.lightning_decays(H), jnp.float32)  # the default ("transnormer") decays

    def one_head(xs):
        qh, kh, vh, ch, lam_h = xs                               # [B, T, 1, D] each, lam_h scalar
        loss = lambda q, k, v: jnp.sum(
            linear.lightning_attention(q, k, v, decays=lam_h[None], impl="parallel")[0] * ch)
        return jax.grad(loss, argnums=(0, 1, 2))(qh, kh, vh)

    def f(q, k, v, g, c):
        heads = lambda x: jnp.moveaxis(x, 2, 0)[:, :, :, None]   # [H, B, T, 1, D]
        grads = lax.map(one_head, (heads(q), heads(k), heads(v), heads(c), lam))
        return tuple(jnp.moveaxis(d[:, :, :, 0], 0, 2) for d in grads)

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
    ap.add_argument("--parallel-mode", choices=("auto", "batched", "per_head"), default="auto",
                    help="how the parallel form is run (see above); auto = batched if it fits, else per head")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-seconds", type=float, default=60.0)
    ap.add_argument("--max-temp-gib", type=float, default=16.0,
                    help="skip (or for parallel/auto: run per head) above this compiled temp footprint")
    ap.add_argument("--quick", action="store_true", help="T in {512, 1024}, 2 repeats, no plot")
    ap.add_argument("--merge", action="store_true",
                    help="replace/add the measured (form, T) rows in the existing OUT.json instead of overwriting")
    ap.add_argument("--merge-forms", default=None,
                    help="with --merge: merge only these forms' rows (e.g. 'parallel'; a parallel row keeps the "
                         "chunk time of its own run in 'same_run_chunk')")
    ap.add_argument("--out", default=os.path.join(common.results_dir(), "linear"))
    args = ap.parse_args(argv)
    seq_lens = [512, 1024] if args.quick else [int(s) for s in args.seq_lens.split(",")]
    repeats = 2 if args.quick else args.repeats
    names = args.forms.split(",")
    impls = forms()
    env = common.environment()
    run = {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "repeats": repeats,
           "load_average_at_start": env["load_average_at_start"], "argv": list(sys.argv[1:] if argv is None else argv)}
    print(f"linear attention, fwd+bwd, {args.tokens} tokens per batch, H={H} D={D} float32 "
          f"on {jax.default_backend()} ({os.cpu_count()} cores)")
    rows, prev = [], {}
    for T in seq_lens:
        if args.tokens % T:
            raise SystemExit(f"--tokens {args.tokens} is not a multiple of T={T}")
        B = args.tokens // T
        q, k, v, c, g = _inputs(B, T)
        abstract = common.abstract(q, k, v, g, c)
        for name in names:
            row = {"form": name, "T": T, "B": B, "median_s": None, "tokens_per_s": None, "skipped": None}
            budget = min(0.7 * _ram_bytes(), args.max_temp_gib * 2 ** 30)
            fn = fwd_bwd(impls[name])
            if name == "parallel":
                mode = args.parallel_mode
                if mode == "auto":
                    batched_mem = common.compiled_memory(fn, *abstract)
                    row["batched_temp_bytes"] = batched_mem["temp_bytes"]
                    mode = "batched" if batched_mem["temp_bytes"] <= budget else "per_head"
                if mode == "per_head":
                    fn = parallel_per_head_fwd_bwd()
                row["method"] = ("parallel (batched: one jit(grad) over all heads)" if mode == "batched" else
                                 f"parallel (per-head: lax.map over the {H} heads, fwd+bwd of one head per step)")
            mem = common.compiled_memory(fn, *abstract)
            row["temp_bytes"] = mem["temp_bytes"]
            growth = 4.5 if name in QUADRATIC else 2.2
            if mem["temp_bytes"] > budget:
                row["skipped"] = (f"needs {common.fmt_bytes(mem['temp_bytes'])} > budget {common.fmt_bytes(budget)} "
                                  f"(min of 70% of free RAM, --max-temp-gib)")
            elif name in prev and prev[name] * growth > args.max_seconds:
                row["skipped"] = f"predicted {prev[name] * growth:.0f} s per run > {args.max_seconds:.0f} s"
            else:
                t = common.time_call(fn, q, k, v, g, c, repeats=repeats)
                row.update(median_s=t["median_s"], times_s=t["times_s"], tokens_per_s=args.tokens / t["median_s"])
                prev[name] = t["median_s"]
            row["run"] = run
            rows.append(row)
            print(f"T={T:6d} B={B:3d} {name:10s} "
                  + (f"{row['median_s'] * 1e3:9.1f} ms  {row['tokens_per_s']:10.0f} tok/s" if row["median_s"] else
                     f"[skipped: {row['skipped']}]")
                  + f"  temp {common.fmt_bytes(row['temp_bytes'])}"
                  + (f"  [{row['method']}]" if "method" in row else ""), flush=True)
    attach_same_run_chunk(rows)
    config = {"tokens": args.tokens, "H": H, "D": D, "dtype": "float32", "repeats": repeats}
    if args.merge and os.path.exists(args.out + ".json"):
        with open(args.out + ".json") as f:
            old = json.load(f)
        keep = None if args.merge_forms is None else set(args.merge_forms.split(","))
        env, config, rows = merge_into(old, rows, run, config, keep)
        seq_lens = sorted({r["T"] for r in rows})
        names = [n for n in forms() if any(r["form"] == n for r in rows)]
    table, summary = _summarise(rows, seq_lens, names)
    print("\n" + table + "\n")
    for line in summary["verdicts"]:
        print(line)
    payload = {"environment": env, "config": config, "rows": rows, "summary": summary}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    common.write_json(args.out + ".json", payload)
    print(f"\nwrote {args.out}.json")
    if not args.quick:
        _plot(rows, seq_lens, names, args.out + ".png")
        print(f"wrote {args.out}.png")
    return payload


def attach_same_run_chunk(rows):
    """Give each timed parallel row the chunk time of the same run and T (ratios across runs of a
    loaded machine mean little)."""
    for r in rows:
        c = next((x for x in rows if x["form"] == "chunk" and x["T"] == r["T"] and x["median_s"]), None)
        if r["form"] == "parallel" and r["median_s"] and c:
            r["same_run_chunk"] = {"median_s": c["median_s"], "tokens_per_s": c["tokens_per_s"],
                                   "chunk_over_parallel": r["median_s"] / c["median_s"]}


def merge_into(old: dict, rows: list, run: dict, config: dict, forms_to_merge=None):
    """``(environment, config, rows)`` of ``old`` (a previous payload) with ``rows`` (of ``forms_to_merge``,
    default all) replacing or extending its ``(form, T)`` rows; every row keeps its run's conditions."""
    key = ("tokens", "H", "D", "dtype")
    if {k: old["config"].get(k) for k in key} != {k: config[k] for k in key}:
        raise SystemExit(f"--merge: the existing results were measured with another config: {old['config']}")
    rows = [r for r in rows if forms_to_merge is None or r["form"] in forms_to_merge]
    new_keys = {(r["form"], r["T"]) for r in rows}
    for r in old["rows"]:
        r.setdefault("run", {"started_utc": None, "repeats": old["config"].get("repeats"),
                             "load_average_at_start": old["environment"].get("load_average_at_start"),
                             "note": "from the original full run"})
    merged = sorted([r for r in old["rows"] if (r["form"], r["T"]) not in new_keys] + rows, key=lambda r: r["T"])
    env = {**old["environment"], "merged_runs": old["environment"].get("merged_runs", []) + [run]}
    return env, {**config, "repeats": "per row (see rows[*].run)"}, merged


def _get(rows, form, T, key="tokens_per_s"):
    for r in rows:
        if r["form"] == form and r["T"] == T:
            return r.get(key)
    return None


def _summarise(rows, seq_lens, names):
    header = ["T", *names, "chunk/parallel speed (same run)", "chunk/softmax speed"]
    out = []
    for T in seq_lens:
        tps = {n: _get(rows, n, T) for n in names}
        ratio = lambda a, b: "-" if a is None or b is None else f"{a / b:.2f}x"
        same = _get(rows, "parallel", T, "same_run_chunk")  # ratio within one run when recorded
        c_par = same["tokens_per_s"] if same else tps.get("chunk")
        out.append([T, *("skipped" if tps[n] is None else f"{tps[n]:.0f}" for n in names),
                    ratio(c_par, tps.get("parallel")), ratio(tps.get("chunk"), tps.get("softmax"))])
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
    same = _get(rows, "parallel", T_max, "same_run_chunk")
    if same:  # prefer the ratio measured in one run
        c = same["tokens_per_s"]
    if c and p:
        summary["chunk_over_parallel_at_max_T"] = c / p
        method = _get(rows, "parallel", T_max, "method")
        verdicts.append(f"chunk vs parallel at T={T_max}: {c / p:.1f}x faster (target >= 10x) -> "
                        f"{'MET' if c / p >= 10 else 'MISSED'}" + (f" [{method}]" if method else "")
                        + (" (chunk timed in the same run)" if same else ""))
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

"""Softmax variants vs exact softmax attention: fwd+bwd time ratios and compiled temp memory.

    python -m benchmarks.variants [--seq-lens 512,2048] [--memory-len 8192] [--rows a,b,...]
                                  [--repeats 3] [--rounds 2]

A table of named rows (:data:`ROWS`), one function per row: ``row(T) -> Case`` builds the inputs
and the forward+backward callable of that mechanism at sequence length ``T`` (B=1, H=8, D=64,
float32, causal).  The ``softmax`` row (``aj.attention(impl="xla")``, the tiled exact path) is the
baseline: every row of one ``T`` is timed in the same process in alternating rounds
(``common.time_peers``; median of the pooled runs, ``block_until_ready``) and reported as
``time / softmax time``.  Memory is XLA's compiled ``temp_size_in_bytes`` of the fwd+bwd program
(compiling allocates nothing).  At ``--memory-len`` (8192) only the rows marked ``tiled`` are
compiled (not run) and their temp memory is compared with one ``T x S`` float32 score array per
head (``B*H*T*S*4`` bytes): the target is no ``T x S`` temporary.  Targets (issue 14): tiled
normalisers at most 1.2x softmax's time.  Other mechanisms add their rows here (a function and a
:func:`row` decorator).  Writes ``results/bench/variants.json``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Callable

import jax
import jax.numpy as jnp

import attn_jax as aj
from attn_jax import masks
from benchmarks import common

B, H, D = 1, 8, 64


@dataclass
class Case:
    """One row at one length: ``fn(*args)`` runs forward + backward; ``tiled`` marks rows that must
    not build a ``T x S`` temporary."""

    fn: Callable
    args: tuple
    tiled: bool = False
    notes: dict = field(default_factory=dict)


#: name -> row function ``(T) -> Case``, in table order.
ROWS: dict[str, Callable[[int], Case]] = {}


def row(name: str):
    def register(fn):
        ROWS[name] = fn
        return fn
    return register


def _qkv(T: int):
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v, c = (jax.random.normal(kk, (B, T, H, D), jnp.float32) for kk in ks)
    return q, k, v, c


def _fwd_bwd(attend: Callable, T: int, tiled: bool) -> Case:
    """Gradient of ``sum(attend(q, k, v) * c)`` w.r.t. q, k, v, jitted."""
    q, k, v, c = _qkv(T)

    def loss(q, k, v):
        return jnp.sum(attend(q, k, v) * c)

    return Case(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (q, k, v), tiled)


CAUSAL = masks.causal()


@row("softmax")
def softmax_row(T: int) -> Case:
    """Baseline: exact softmax, ``aj.attention(impl="xla")`` (tiled, custom VJP)."""
    return _fwd_bwd(lambda q, k, v: aj.attention(q, k, v, mask=CAUSAL, impl="xla"), T, tiled=True)


@row("sigmoid")
def sigmoid_row(T: int) -> Case:
    return _fwd_bwd(lambda q, k, v: aj.variants.sigmoid_attention(q, k, v, mask=CAUSAL, impl="xla"), T, tiled=True)


@row("relu")
def relu_row(T: int) -> Case:
    return _fwd_bwd(lambda q, k, v: aj.variants.relu_attention(q, k, v, mask=CAUSAL, impl="xla"), T, tiled=True)


@row("softplus")
def softplus_row(T: int) -> Case:
    return _fwd_bwd(lambda q, k, v: aj.variants.softplus_attention(q, k, v, mask=CAUSAL, impl="xla"), T,
                    tiled=True)


@row("clipped_softmax")
def clipped_softmax_row(T: int) -> Case:
    return _fwd_bwd(lambda q, k, v: aj.variants.clipped_softmax(q, k, v, mask=CAUSAL, gamma=-0.03), T, tiled=False)


@row("sparsemax")
def sparsemax_row(T: int) -> Case:
    return _fwd_bwd(lambda q, k, v: aj.variants.sparsemax_attention(q, k, v, mask=CAUSAL), T, tiled=False)


@row("entmax_1.5_30it")
def entmax_row(T: int) -> Case:
    return _fwd_bwd(lambda q, k, v: aj.variants.entmax_attention(q, k, v, mask=CAUSAL, alpha=1.5, n_iter=30), T,
                    tiled=False)


@row("cog")
def cog_row(T: int) -> Case:
    return _fwd_bwd(lambda q, k, v: aj.variants.cog_attention(q, k, v, mask=CAUSAL), T, tiled=False)


def _memory(case: Case) -> int:
    return common.compiled_memory(case.fn, *common.abstract(*case.args))["temp_bytes"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", default="512,2048")
    ap.add_argument("--memory-len", type=int, default=8192)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    names = [n for n in args.rows.split(",") if n]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown rows {unknown}; rows: {list(ROWS)}")
    if "softmax" not in names:
        names.insert(0, "softmax")
    out = {"environment": common.environment(), "config": dict(B=B, H=H, D=D, dtype="float32", mask="causal"),
           "timing": {}, "memory_at_long": {}}
    table = []
    for T in (int(t) for t in args.seq_lens.split(",")):
        cases = {n: ROWS[n](T) for n in names}
        times = common.time_peers({n: (c.fn, c.args, None) for n, c in cases.items()}, repeats=args.repeats,
                                  rounds=args.rounds)
        base = times["softmax"]["median_s"]
        for n, c in cases.items():
            t, mem = times[n]["median_s"], _memory(c)
            out["timing"].setdefault(str(T), {})[n] = {"median_s": t, "min_s": times[n]["min_s"],
                                                      "ratio_vs_softmax": t / base, "temp_bytes": mem,
                                                      "tiled": c.tiled}
            table.append((T, n, common.fmt_time(t), f"{t / base:.2f}x", common.fmt_bytes(mem),
                          "tiled" if c.tiled else "materialised"))
    print(common.format_table(("T", "row", "fwd+bwd", "vs softmax", "temp memory", "form"), table))

    L = args.memory_len
    scores = B * H * L * L * 4
    long_rows = []
    for n in names:
        c = ROWS[n](L)
        if not c.tiled:
            continue
        mem = _memory(c)
        out["memory_at_long"][n] = {"T": L, "temp_bytes": mem, "one_TxS_f32_bytes": scores,
                                    "no_TxS_temporary": mem < scores}
        long_rows.append((L, n, common.fmt_bytes(mem), common.fmt_bytes(scores), "yes" if mem < scores else "NO"))
    print()
    print(common.format_table(("T", "row", "temp memory", "one T x S f32 (B*H)", "< T x S"), long_rows))
    path = f"{common.results_dir()}/variants.json"
    common.write_json(path, out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

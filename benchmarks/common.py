"""Timing and memory helpers shared by the benchmarks (BUILD.md, "Benchmarks").

* :func:`time_peers` -- :func:`time_call` for peers in alternating rounds (ratios share the load).
* :func:`time_call` -- median wall time of ``fn(*args)`` over ``repeats`` runs after warm-up,
  synchronised with ``jax.block_until_ready`` (or any ``sync`` callable for other frameworks).
* :func:`compiled_memory` -- XLA's compiled memory analysis of ``jax.jit(fn)`` for abstract
  inputs; compiling allocates nothing, so even configurations too large to run can be measured.
* :func:`torch_or_none`, :func:`write_json`, :func:`results_dir`, :func:`format_table`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np


def time_call(fn: Callable, *args, repeats: int = 5, warmup: int = 1, sync: Callable | None = None) -> dict:
    """``{"median_s", "min_s", "times_s"}`` (wall) and ``{"cpu_median_s", "cpu_times_s"}`` (process CPU
    time: the steadier number on a shared machine) for ``fn(*args)``; the warm-up runs are not timed."""
    sync = jax.block_until_ready if sync is None else sync
    for _ in range(warmup):
        sync(fn(*args))
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        sync(fn(*args))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times,
            "cpu_median_s": statistics.median(cpu), "cpu_times_s": cpu}


def time_peers(fns: dict[str, tuple[Callable, tuple, Callable | None]], *, repeats: int = 5,
               rounds: int = 2) -> dict[str, dict]:
    """:func:`time_call` for several peers in ``rounds`` alternating rounds, pooled per peer.

    ``fns``: name -> ``(fn, args, sync)`` (``sync`` None: ``jax.block_until_ready``).  Each
    round times every peer in turn (one warm-up, then ``repeats`` runs back to back: XLA's and
    torch's thread pools keep spinning briefly after a call, so strict one-run round-robin would
    charge each framework for the other's spinning).  Alternating rounds spreads a load change on
    a shared machine over all peers; median and min are over the ``rounds * repeats`` pooled runs.
    """
    times: dict[str, list] = {n: [] for n in fns}
    for _ in range(rounds):
        for n, (fn, args, sync) in fns.items():
            times[n] += time_call(fn, *args, repeats=repeats, warmup=1, sync=sync)["times_s"]
    return {n: {"median_s": statistics.median(t), "min_s": min(t), "times_s": t} for n, t in times.items()}


def abstract(*arrays) -> list:
    return [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays]


def compiled_memory(fn: Callable, *args) -> dict:
    """Compiled memory analysis of ``jax.jit(fn)``; ``args`` may be ``ShapeDtypeStruct``."""
    compiled = jax.jit(fn).lower(*args).compile()
    m = compiled.memory_analysis()
    return {
        "temp_bytes": int(m.temp_size_in_bytes),
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
    }


def torch_or_none():
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    return torch


def results_dir(sub: str = "bench") -> str:
    path = os.path.join("results", sub)
    os.makedirs(path, exist_ok=True)
    return path


def environment() -> dict[str, Any]:
    env = {"jax": jax.__version__, "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
           "machine": platform.machine(), "python": platform.python_version(),
           "load_average_at_start": os.getloadavg()}
    torch = torch_or_none()
    if torch is not None:
        env["torch"] = torch.__version__
    return env


def write_json(path: str, payload: dict) -> None:
    def default(o):
        if isinstance(o, (np.integer,)):
            return int(o)
        if isinstance(o, (np.floating,)):
            return float(o)
        raise TypeError(type(o))

    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=default)


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_time(t: float | None) -> str:
    return "skipped" if t is None else f"{t * 1e3:.1f} ms"


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

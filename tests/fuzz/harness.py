"""Run one fuzz case (a plain dict from :mod:`tests.fuzz.strategies`) against the float64 oracle.

``check(case)`` draws the arrays from ``case["seed"]``, runs every backend / form the case names
under one ``jax.jit`` (forward and VJP), and raises ``AssertionError`` naming the backend and the
quantity that disagrees with :mod:`tests.fuzz.oracle`:

* exact attention: ``o``, ``lse`` and ``dq, dk, dv, dbias, dsinks`` (random cotangents) within
  the tolerance of the case's dtype (``attn_jax.core.testing.TOLERANCES``); with ``nan`` every
  query row and key/value column that no visible pair uses holds NaN/+-Inf, and nothing may
  change.  Backends that declare the case unsupported (``aj.explain``) are skipped here (the
  conformance suite checks that they refuse).
* decode: every prefill / step output over the plain, ring or paged cache equals the oracle's
  causal (windowed) attention over that row's tokens; padding queries give exactly zero.
* linear family: every form's output equals the token-loop oracle (float64), and the gradient of
  every form along a random direction equals the oracle's central finite difference; with
  ``nan_padding`` the padding tokens hold NaN.

``reproducer(case)`` is the Python source that re-runs a case (what the campaign writes).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from tests.fuzz import oracle

#: Backends a case may name: how each runs on this CPU (Pallas kernels in interpret mode).
PALLAS = ("pallas-gpu", "pallas-tpu")


def _bad_values(shape):
    return np.resize(np.array([np.nan, np.inf, -np.inf]), shape)


# ----------------------------------------------------------------------------- exact attention


def build_mask(spec):
    """The attn_jax mask of an oracle mask spec."""
    from attn_jax import masks

    if spec is None:
        return None
    kind = spec["kind"]
    if kind in ("and", "or"):
        parts = [build_mask(p) for p in spec["parts"]]
        out = parts[0]
        for p in parts[1:]:
            out = (out & p) if kind == "and" else (out | p)
        return out
    off = spec.get("offset")
    off = jnp.asarray(off, jnp.int32) if isinstance(off, list) else off
    if kind == "causal":
        return masks.causal(offset=off)
    if kind == "window":
        return masks.sliding_window(spec["left"], spec["right"], offset=off)
    if kind == "chunked":
        return masks.chunked(spec["size"], offset=off)
    if kind == "prefix":
        return masks.prefix_lm(spec["n"], offset=off)
    if kind == "segments":
        return masks.segments(jnp.asarray(spec["q"], jnp.int32),
                              None if spec["kv"] is None else jnp.asarray(spec["kv"], jnp.int32))
    if kind == "key_padding":
        return masks.key_padding(jnp.asarray(spec["lengths"], jnp.int32))
    if kind == "dense":
        return masks.dense(jnp.asarray(spec["rows"], bool))
    raise ValueError(f"unknown mask kind {kind!r}")


def exact_inputs(case):
    """NumPy inputs of an exact case (in the case dtype; bias/sinks float32) and the oracle's view."""
    B, T, S, H, K, Dk, Dv = (case[n] for n in ("B", "T", "S", "H", "K", "Dk", "Dv"))
    rng = np.random.default_rng(case["seed"])
    dt = jnp.dtype(case["dtype"])
    gain = 3.0 if case["softcap"] else 1.0
    d = {"q": (gain * rng.standard_normal((B, T, H, Dk))).astype(dt),
         "k": rng.standard_normal((B, S, K, Dk)).astype(dt), "v": rng.standard_normal((B, S, K, Dv)).astype(dt)}
    vis = oracle.visibility(case["mask"], B, H, T, S)
    bias = None
    if case["bias"] == "alibi":
        bias = oracle.alibi_bias(oracle.alibi_slopes(H), T, S)
    elif case["bias"] is not None:
        sizes = dict(B=B, H=H, T=T, S=S)
        bias = rng.standard_normal([1 if s == "1" else sizes[s] for s in case["bias"].split()]).astype(np.float32)
        if case["neg_inf_bias_rows"] and bias.shape[2] == T and T > 1:
            bias[..., T // 2, :] = -np.inf          # the bias hides a whole row: zero output, zero gradients
    d["bias"] = bias
    d["sinks"] = rng.standard_normal(H).astype(dt) if case["sinks"] else None
    d["do"] = rng.standard_normal((B, T, H, Dv)).astype(dt)
    d["dlse"] = rng.standard_normal((B, T, H)).astype(np.float32)
    if case["nan"] == "unused":
        rows, cols = oracle._used(vis, K)
        d["q"] = np.where(rows[..., None], d["q"], _bad_values(d["q"].shape)).astype(dt)
        d["k"] = np.where(cols[..., None], d["k"], _bad_values(d["k"].shape)).astype(dt)
        d["v"] = np.where(cols[..., None], d["v"], _bad_values(d["v"].shape)).astype(dt)
    return d, vis


def _backend_fn(name, case):
    import attn_jax as aj
    from attn_jax.softmax import pallas as P
    from attn_jax.softmax import xla as X

    if name == "xla":
        return lambda q, k, v, **kw: X.attention_blockwise(q, k, v, block_q=case["block_q"], block_k=case["block_k"],
                                                           **kw)
    if name in PALLAS:
        return lambda q, k, v, **kw: P.flash_attention(q, k, v, platform=name.split("-")[1], interpret=True,
                                                       block_q=16, block_k=16, **kw)
    return lambda q, k, v, **kw: aj.attention(q, k, v, impl=name, **kw)


def _served(name, case, d, mask, bias):
    import attn_jax as aj

    backend, platform = {"pallas-gpu": ("pallas", "cuda"), "pallas-tpu": ("pallas", "tpu")}.get(name, (name, "cpu"))
    dec = aj.explain(d["q"], d["k"], d["v"], mask=mask, bias=bias, sinks=d["sinks"], scale=case["scale"],
                     softcap=case["softcap"], return_lse=True, impl=backend, platform=platform)
    return not dec.reasons[platform][backend]


def check_exact(case):
    from attn_jax.core import testing as tk
    from attn_jax.positional.alibi import ALiBi

    d, vis = exact_inputs(case)
    mask = build_mask(case["mask"])
    bias = ALiBi(oracle.alibi_slopes(case["H"]).astype(np.float32)) if case["bias"] == "alibi" else d["bias"]
    names = [n for n in case["backends"] if _served(n, case, d, mask, bias)]
    kw = dict(scale=case["scale"], softcap=case["softcap"], return_lse=True)

    def program(q, k, v, bias, sinks, mask, do, dlse):
        out = {}
        for n in names:
            f = _backend_fn(n, case)
            (o, lse), pull = jax.vjp(lambda q, k, v, b, s: f(q, k, v, mask=mask, bias=b, sinks=s, **kw),
                                     q, k, v, bias, sinks)
            out[n] = (o, lse, pull((do.astype(o.dtype), jnp.where(jnp.isfinite(lse), dlse, 0.0))))
        return out

    ctx = _tpu_context() if "pallas-tpu" in names else _null()
    with ctx:
        res = jax.jit(program, compiler_options=tk.FAST_COMPILE)(d["q"], d["k"], d["v"], bias, d["sinks"], mask,
                                                                 d["do"], d["dlse"])
    f64 = lambda x: None if x is None else np.asarray(x, np.float64)  # noqa: E731
    ob = dict(bias=f64(d["bias"]), scale=case["scale"], softcap=case["softcap"], sinks=f64(d["sinks"]))
    o_ref, lse_ref = oracle.attention(f64(d["q"]), f64(d["k"]), f64(d["v"]), vis, **ob)
    g = oracle.attention_vjp(f64(d["q"]), f64(d["k"]), f64(d["v"]), vis, f64(d["do"]), f64(d["dlse"]), **ob)
    dt = case["dtype"]
    for n, (o, lse, (dq, dk, dv, db, ds)) in res.items():
        what = f"{n}: "
        tk.assert_close(o, o_ref, dtype=dt, name=what + "o")
        tk.assert_close(lse, lse_ref, dtype="float32", name=what + "lse")
        for name, x, r in (("dq", dq, g["dq"]), ("dk", dk, g["dk"]), ("dv", dv, g["dv"])):
            tk.assert_close(x, r, dtype=dt, grad=True, name=what + name)
        if d["bias"] is not None and case["bias"] != "alibi":
            rb = g["dbias"]
            for ax, size in enumerate(d["bias"].shape):
                if size == 1:
                    rb = rb.sum(axis=ax, keepdims=True)
            tk.assert_close(db, rb, dtype=dt, grad=True, name=what + "dbias")
        if d["sinks"] is not None:
            tk.assert_close(ds, g["dsinks"], dtype=dt, grad=True, name=what + "dsinks")
    return names


# ----------------------------------------------------------------------------- decode


def check_decode(case):
    from attn_jax.core import testing as tk
    from attn_jax.softmax import decode
    from attn_jax.softmax.kv_cache import KVCache, PagedKVCache, RingKVCache

    B, H, K, Dk, Dv = (case[n] for n in ("B", "H", "K", "Dk", "Dv"))
    rng = np.random.default_rng(case["seed"])
    chunks = case["chunks"]
    data = []
    for c in chunks:
        q = rng.standard_normal((B, c["T"], H, Dk)).astype(np.float32)
        k = rng.standard_normal((B, c["T"], K, Dk)).astype(np.float32)
        v = rng.standard_normal((B, c["T"], K, Dv)).astype(np.float32)
        if case["nan_padding"]:
            pad = np.arange(c["T"])[None, :] >= np.asarray(c["n_new"])[:, None]
            q, k, v = (np.where(pad[:, :, None, None], _bad_values(x.shape), x).astype(np.float32) for x in (q, k, v))
        data.append((q, k, v, np.asarray(c["n_new"], np.int32)))
    total = sum(c["T"] for c in chunks)
    window = case["window"]
    if case["cache"] == "plain":
        cache = KVCache.init(B, total, K, Dk, value_dim=Dv)
    elif case["cache"] == "ring":
        cache = RingKVCache.init(B, window, K, Dk, value_dim=Dv)
    else:
        P = case["page_size"]
        M = -(-total // P)
        cache = PagedKVCache.init(B, B * M, P, M, K, Dk, value_dim=Dv)
    kw = dict(softcap=case["softcap"])
    if case["cache"] != "ring" and window is not None:
        kw["window"] = window

    def program(cache, data):
        outs = []
        for q, k, v, n in data:
            o, cache = decode.prefill(q, k, v, cache, n_new=n, **kw)
            outs.append(o)
        return outs

    outs = jax.jit(program, compiler_options=tk.FAST_COMPILE)(cache, data)
    # oracle: per row, its valid tokens in order; causal (& window) attention over them
    for b in range(B):
        toks = [(c_i, t) for c_i, c in enumerate(chunks) for t in range(c["n_new"][b])]
        for c_i, c in enumerate(chunks):
            pad = np.asarray(outs[c_i])[b, c["n_new"][b]:]
            if np.any(pad != 0):
                raise AssertionError(f"decode/{case['cache']}: chunk {c_i} row {b}: padding queries are not zero")
        if not toks:
            continue
        sel = lambda i: np.stack([data[c_i][i][b, t] for c_i, t in toks])[None]  # noqa: E731
        q, k, v = sel(0), sel(1), sel(2)
        N = len(toks)
        spec = {"kind": "causal", "offset": 0}
        if window is not None:
            spec = {"kind": "and", "parts": [spec, {"kind": "window", "left": window, "right": 0, "offset": 0}]}
        o_ref, _ = oracle.attention(q, k, v, oracle.visibility(spec, 1, H, N, N), softcap=case["softcap"])
        got = np.stack([np.asarray(outs[c_i])[b, t] for c_i, t in toks])[None]
        tk.assert_close(got, o_ref, dtype="float32", name=f"decode/{case['cache']} row {b}")
    return [case["cache"]]


# ----------------------------------------------------------------------------- linear family


def linear_inputs(case):
    B, T, H, K, Dk, Dv = (case[n] for n in ("B", "T", "H", "K", "Dk", "Dv"))
    rng = np.random.default_rng(case["seed"])
    d = {"q": rng.standard_normal((B, T, H, Dk)), "k": rng.standard_normal((B, T, K, Dk)),
         "v": rng.standard_normal((B, T, K, Dv))}
    op = case["op"]
    if op in ("delta_rule", "gated_delta_rule"):
        d["k"] = d["k"] / np.linalg.norm(d["k"], axis=-1, keepdims=True)     # the delta rule wants unit keys
        d["beta"] = rng.uniform(0.05, 0.95, (B, T, H))
    lo, hi = (-5.0, -2.0) if case["gate"] == "strong" else (-0.05, -0.001)
    if op == "gla":
        d["log_g"] = rng.uniform(lo, hi, (B, T, H, Dk))
    elif op in ("gla_scalar", "gated_delta_rule"):
        d["log_g"] = rng.uniform(lo, hi, (B, T, H))
    d["h0"] = rng.standard_normal((B, H, Dk, Dv)) if case["initial_state"] else None
    return d


def _linear_call(case, impl, d, seg):
    from attn_jax import linear

    op = case["op"]
    kw = dict(impl=impl, segment_ids=seg, chunk_size=16)
    h0 = d.get("h0")
    if op in ("gla", "gla_scalar"):
        return linear.gated_linear_attention(d["q"], d["k"], d["v"], d["log_g"], initial_state=h0, **kw)[0]
    if op == "delta_rule":
        return linear.delta_rule(d["q"], d["k"], d["v"], d["beta"], initial_state=h0, **kw)[0]
    if op == "gated_delta_rule":
        return linear.gated_delta_rule(d["q"], d["k"], d["v"], d["beta"], d["log_g"], initial_state=h0, **kw)[0]
    return linear.linear_attention(d["q"], d["k"], d["v"], **kw)[0]


def _linear_oracle(case, d, seg):
    op = case["op"]
    if op in ("gla", "gla_scalar"):
        return oracle.gated_loop(d["q"], d["k"], d["v"], d.get("log_g"), initial_state=d.get("h0"),
                                 segment_ids=seg)[0]
    if op in ("delta_rule", "gated_delta_rule"):
        return oracle.delta_loop(d["q"], d["k"], d["v"], d["beta"], d.get("log_g"), initial_state=d.get("h0"),
                                 segment_ids=seg)[0]
    return oracle.normalised_loop(d["q"], d["k"], d["v"], segment_ids=seg)


def check_linear(case):
    from attn_jax.core import testing as tk

    d = linear_inputs(case)
    seg = None if case["segments"] is None else np.asarray(case["segments"], np.int32)
    names = sorted(n for n, x in d.items() if x is not None)
    rng = np.random.default_rng(case["seed"] + 1)
    direction = {n: rng.standard_normal(d[n].shape) for n in names}
    ct = rng.standard_normal((case["B"], case["T"], case["H"], case["Dv"]))
    pad = np.zeros((case["B"], case["T"]), bool) if seg is None else seg == 0
    dirty = dict(d)
    if case["nan_padding"] and pad.any():
        for n in ("q", "k", "v", "beta", "log_g"):
            if n in d:
                x = d[n]
                dirty[n] = np.where(pad.reshape(pad.shape + (1,) * (x.ndim - 2)), np.nan, x)
    # the direction never moves padding (its gradient is 0 and the oracle ignores those tokens)
    for n in names:
        if n != "h0":
            direction[n] = np.where(pad.reshape(pad.shape + (1,) * (d[n].ndim - 2)), 0.0, direction[n])

    def program(arrays):
        out = {}
        for impl in case["forms"]:
            f = lambda *xs, impl=impl: _linear_call(case, impl, dict(zip(names, xs)), seg)  # noqa: E731
            o, pull = jax.vjp(f, *[arrays[n] for n in names])
            out[impl] = (o, dict(zip(names, pull(jnp.asarray(ct, o.dtype)))))
        return out

    with tk.float64():
        res = jax.jit(program)({n: jnp.asarray(x) for n, x in dirty.items() if x is not None})
        res = jax.tree.map(np.asarray, res)
    o_ref = _linear_oracle(case, d, seg)

    def loss(x):
        dd = dict(d)
        off = 0
        for n in names:
            size = d[n].size
            dd[n] = x[off:off + size].reshape(d[n].shape)
            off += size
        return float((_linear_oracle(case, dd, seg) * ct).sum())

    x0 = np.concatenate([d[n].ravel() for n in names])
    dir_flat = np.concatenate([direction[n].ravel() for n in names])
    fd = oracle.finite_difference(loss, x0, dir_flat)
    for impl, (o, grads) in res.items():
        tk.assert_close(o, o_ref, dtype="float64", rel=1e-8, atol=1e-7, name=f"{case['op']}/{impl}: o")
        for n, gr in grads.items():
            if not np.isfinite(gr).all():
                raise AssertionError(f"{case['op']}/{impl}: d{n} is not finite")
            if n != "h0" and np.any(gr[pad] != 0):
                raise AssertionError(f"{case['op']}/{impl}: d{n} is non-zero at padding")
        ddir = sum(float((grads[n] * direction[n]).sum()) for n in names)
        if not abs(ddir - fd) <= 1e-5 * max(1.0, abs(fd)):
            raise AssertionError(f"{case['op']}/{impl}: directional derivative {ddir:.9g} != oracle finite "
                                 f"difference {fd:.9g}")
    return case["forms"]


# ----------------------------------------------------------------------------- dispatch


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _tpu_context():
    from tests.softmax.conformance import _tpu_races

    return _tpu_races()


def check(case) -> list[str]:
    """Run one case; returns what ran; raises AssertionError on a disagreement."""
    fam = case["family"]
    if fam == "exact":
        return check_exact(case)
    if fam == "decode":
        return check_decode(case)
    if fam == "linear":
        return check_linear(case)
    raise ValueError(f"unknown case family {fam!r}")


def reproducer(case) -> str:
    """Python source that re-runs ``case`` (``python this_file.py`` from the repository root)."""
    return ("# fuzz reproducer (attn_jax): run from the repository root with `python -m` or PYTHONPATH=.\n"
            "import json\n\nfrom tests.fuzz.harness import check\n\n"
            f"CASE = json.loads({json.dumps(json.dumps(case))})\n\n"
            "if __name__ == '__main__':\n    check(CASE)\n    print('passes')\n")

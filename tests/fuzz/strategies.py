"""Hypothesis strategies for the fuzzer: every case is a plain, JSON-serialisable dict.

A case holds shapes, dtype, a mask spec (the plain dicts of :mod:`tests.fuzz.oracle`), bias /
softcap / sinks / scale, where NaN goes, block sizes and a data seed; the arrays are drawn from
the seed by :mod:`tests.fuzz.harness`, so a case written to JSON is a complete reproducer.

Shapes are drawn from a few values (XLA compiles once per shape), with the awkward ones on
purpose: ``T != S`` both ways, ``T = 1``, GQA (``H = K G``), ``Dk != Dv``, lengths that are not
multiples of the block sizes.  Masks: every primitive (positional ones with default, integer and
per-row offsets, windows at their borders up to ``2**31 - 1``, chunked, prefix, packed segments
with padding, key padding, dense), and ``&`` / ``|`` compositions of two or three of them.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

#: The largest window bound a mask accepts ("unbounded").
UNBOUNDED = 2 ** 31 - 1

DTYPES = ("float32", "float32", "bfloat16", "float16")


@st.composite
def segment_ids(draw, B: int, n: int, max_docs: int = 3):
    """``[B][n]`` packed ids: runs of 1..max_docs with some zero (padding) tokens anywhere."""
    rows = []
    for _ in range(B):
        ids, doc = [], 1
        for _ in range(n):
            r = draw(st.integers(0, 9))
            if r == 0:
                ids.append(0)                           # padding, anywhere (also mid-row)
                continue
            if r == 1 and doc < max_docs:
                doc += 1
            ids.append(doc)
        rows.append(ids)
    return rows


@st.composite
def offsets(draw, B: int, T: int, S: int, per_row: bool = True):
    kind = draw(st.sampled_from(["default", "default", "int", "row"] if per_row else ["default", "int"]))
    if kind == "default":
        return None
    if kind == "int":
        return draw(st.integers(-T - 1, S + 1))
    return [draw(st.integers(-T, S)) for _ in range(B)]


@st.composite
def leaf_masks(draw, B: int, H: int, T: int, S: int):
    kind = draw(st.sampled_from(["causal", "window", "chunked", "prefix", "segments", "key_padding", "dense"]))
    if kind == "causal":
        return {"kind": "causal", "offset": draw(offsets(B, T, S))}
    if kind == "window":
        bound = st.sampled_from([0, 1, 2, 5, S, UNBOUNDED])
        return {"kind": "window", "left": draw(bound), "right": draw(bound), "offset": draw(offsets(B, T, S))}
    if kind == "chunked":
        return {"kind": "chunked", "size": draw(st.integers(1, max(S, 1))), "offset": draw(offsets(B, T, S))}
    if kind == "prefix":
        return {"kind": "prefix", "n": draw(st.integers(0, S + 1)), "offset": draw(offsets(B, T, S))}
    if kind == "segments":
        q = draw(segment_ids(B, T))
        kv = None if (T == S and draw(st.booleans())) else draw(segment_ids(B, S))
        return {"kind": "segments", "q": q, "kv": kv}
    if kind == "key_padding":
        return {"kind": "key_padding", "lengths": [draw(st.integers(0, S)) for _ in range(B)]}
    b, h = draw(st.sampled_from([1, B])), draw(st.sampled_from([1, H]))
    density = draw(st.sampled_from([0.2, 0.7]))
    seed = draw(st.integers(0, 2 ** 16))
    rows = (np.random.default_rng(seed).random((b, h, T, S)) < density).astype(int).tolist()
    return {"kind": "dense", "rows": rows}


@st.composite
def mask_specs(draw, B: int, H: int, T: int, S: int):
    """None, a primitive mask, or an ``&`` / ``|`` of two or three of them."""
    n = draw(st.sampled_from([0, 1, 1, 2, 2, 3]))
    if n == 0:
        return None
    parts = [draw(leaf_masks(B, H, T, S)) for _ in range(n)]
    if n == 1:
        return parts[0]
    if n == 3 and draw(st.booleans()):   # mixed: (a | b) & c
        return {"kind": "and", "parts": [{"kind": "or", "parts": parts[:2]}, parts[2]]}
    return {"kind": draw(st.sampled_from(["and", "and", "or"])), "parts": parts}


@st.composite
def exact_cases(draw, backends=("reference", "xla", "dense")):
    """One exact-attention case (see the module docstring) run on ``backends``."""
    B = draw(st.sampled_from([1, 2]))
    T = draw(st.sampled_from([1, 5, 16, 17, 33]))
    S = draw(st.sampled_from([1, 7, 16, 24, 33]))
    K = draw(st.sampled_from([1, 2]))
    H = K * draw(st.sampled_from([1, 2]))
    Dk = draw(st.sampled_from([4, 8, 12]))
    Dv = draw(st.sampled_from([Dk, 6]))
    return {
        "family": "exact", "B": B, "T": T, "S": S, "H": H, "K": K, "Dk": Dk, "Dv": Dv,
        "dtype": draw(st.sampled_from(DTYPES)),
        "mask": draw(mask_specs(B, H, T, S)),
        "bias": draw(st.sampled_from([None, None, "1 1 T S", "B H T S", "1 H 1 S", "B 1 1 S", "alibi"])),
        "neg_inf_bias_rows": draw(st.booleans()),       # a dense bias row of -inf (a row hidden by the bias)
        "softcap": draw(st.sampled_from([None, None, 2.0])),
        "sinks": draw(st.booleans()),
        "scale": draw(st.sampled_from([None, None, 0.4])),
        "nan": draw(st.sampled_from(["none", "unused", "unused"])),   # NaN/+-Inf in every unused row/column
        "block_q": draw(st.sampled_from([8, 16])), "block_k": draw(st.sampled_from([8, 16])),
        "backends": list(backends),
        "seed": draw(st.integers(0, 2 ** 16)),
    }


@st.composite
def decode_cases(draw):
    """A prefill / step-decode sequence over a plain, ring or paged cache."""
    cache = draw(st.sampled_from(["plain", "ring", "paged"]))
    K = draw(st.sampled_from([1, 2]))
    B = 2
    chunks = []
    for _ in range(draw(st.integers(1, 3))):
        T = draw(st.sampled_from([1, 3, 6]))
        chunks.append({"T": T, "n_new": [draw(st.integers(0, T)) for _ in range(B)]})
    window = draw(st.sampled_from([1, 3, 7])) if cache == "ring" else draw(st.sampled_from([None, None, 2, 5]))
    return {
        "family": "decode", "cache": cache, "B": B, "H": K * draw(st.sampled_from([1, 2])), "K": K,
        "Dk": draw(st.sampled_from([4, 8])), "Dv": draw(st.sampled_from([4, 6])), "chunks": chunks, "window": window,
        "softcap": draw(st.sampled_from([None, 2.0])), "page_size": draw(st.sampled_from([2, 4])),
        "nan_padding": draw(st.booleans()),             # NaN in the chunk tokens past n_new (never written)
        "seed": draw(st.integers(0, 2 ** 16)),
    }


@st.composite
def linear_cases(draw):
    """One linear-family case: an op, its gate kind and strength, segments, an initial state."""
    op = draw(st.sampled_from(["gla", "gla_scalar", "linear_attention", "delta_rule", "gated_delta_rule"]))
    T = draw(st.sampled_from([5, 16, 21]))
    B = 2
    K = draw(st.sampled_from([1, 2]))
    return {
        "family": "linear", "op": op, "B": B, "T": T, "H": K * draw(st.sampled_from([1, 2])), "K": K,
        "Dk": draw(st.sampled_from([4, 6])), "Dv": draw(st.sampled_from([3, 5])),
        "gate": draw(st.sampled_from(["strong", "weak"])),   # log gates near -5 or near 0
        "segments": draw(segment_ids(B, T)) if draw(st.booleans()) else None,
        "initial_state": op != "linear_attention" and draw(st.booleans()),
        "nan_padding": draw(st.booleans()),
        "forms": ["reference", "chunk", "parallel", "recurrent"],
        "seed": draw(st.integers(0, 2 ** 16)),
    }

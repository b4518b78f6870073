"""The README feature matrices, computed from the declarations and dispatch registries so they cannot drift.

Each row is a feature posed as a concrete problem; each column asks a registry
whether an implementation serves it:

* ``reference`` / ``xla``: the ``attention`` registry's implementation of that
  name serves the problem when lowered for ``cpu``;
* ``pallas-gpu`` / ``pallas-tpu``: the ``pallas`` implementation serves it when
  lowered for ``cuda`` / ``tpu``;
* ``decode``: the decode path serves it (a one-token query over a KV cache);
* ``mixer``: a registered Flax mixer exposes it.

The positional rows are the positional declarations (:mod:`attn_jax.core.declaration`), the
linear matrix is the catalogue (:mod:`attn_jax.linear.catalog`, itself a view of the linear
declarations); ``--list`` prints every declaration.

``python -m attn_jax.feature_matrix`` prints the table; ``--write README.md``
replaces the block between the ``feature-matrix`` markers.  A test checks the
README against this module.
"""

from __future__ import annotations

import argparse
import importlib
import re
from typing import Callable

import jax
import jax.numpy as jnp

YES, NO, NA = "✓", "—", "n/a"
COLUMNS = ("reference", "xla", "pallas-gpu", "pallas-tpu", "decode", "mixer")
BEGIN, END = "<!-- feature-matrix:begin -->", "<!-- feature-matrix:end -->"
LINEAR_BEGIN, LINEAR_END = "<!-- linear-matrix:begin -->", "<!-- linear-matrix:end -->"
#: Families whose declarations get a README matrix of their own (``<!-- NAME-matrix:begin -->``).
FAMILY_MATRICES = ("variants", "sparse", "local")
FAMILY_COLUMNS = ("mechanism", "paper", "op", "forms besides the reference (impl=)", "causal", "bidirectional",
                  "mixer")
LINEAR_COLUMNS = ("forms besides the reference (impl=)", "pallas-gpu", "pallas-tpu", "causal", "non-causal",
                  "segments", "initial state", "mixer")


def _sds(*shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _attention_rows() -> list[tuple[str, str, dict]]:
    """(row title, feature key used by mixers, attention problem)."""
    from attn_jax import masks
    from attn_jax.positional import ALiBi, LowRankBias, T5RelativeBias, alibi_slopes
    from attn_jax.positional.fire import init_fire
    from attn_jax.positional.relative import RelativeEmbedding

    B, T, H, D = 2, 64, 4, 64
    ids = jnp.ones((B, T), jnp.int32)
    return [
        ("Exact softmax attention (MHA)", "mha", dict()),
        ("GQA / MQA (grouped, no K/V repeat)", "gqa", dict(K=1)),
        ("Dk ≠ Dv", "dk_ne_dv", dict(Dv=32)),
        ("T ≠ S (cross-attention)", "cross", dict(S=96)),
        ("Causal mask (bottom-right aligned)", "causal", dict(mask=masks.causal())),
        ("Sliding window (inclusive)", "sliding_window", dict(mask=masks.causal() & masks.sliding_window(16))),
        ("Chunked local attention", "chunked", dict(mask=masks.chunked(16) & masks.causal())),
        ("Prefix-LM", "prefix_lm", dict(mask=masks.prefix_lm(8))),
        ("Packed segments", "segments", dict(mask=masks.segments(ids) & masks.causal())),
        ("Key padding (lengths)", "key_padding", dict(mask=masks.key_padding(jnp.full((B,), T, jnp.int32)))),
        ("Dense boolean mask", "dense_mask", dict(mask=jnp.ones((1, 1, T, T), bool))),
        ("Additive bias (dense, with dbias)", "bias", dict(bias=_sds(1, H, T, T))),
        ("ALiBi (evaluated per tile)", "alibi", dict(bias=ALiBi(alibi_slopes(H)))),
        ("T5 relative bias (per tile, learned)", "t5", dict(bias=T5RelativeBias(jnp.zeros((32, H))))),
        ("Relative embeddings q·E (Shaw / Music Transformer, skewed per tile)", "relative",
         dict(bias=RelativeEmbedding(jnp.zeros((15, H, D))))),
        ("FIRE (learned functional relative bias, per tile)", "fire", dict(bias=init_fire(jax.random.key(0), H))),
        ("Low-rank bias folded into q/k (FlashBias)", "low_rank_bias",
         dict(bias=LowRankBias(_sds(1, T, H, 2), _sds(1, T, 1, 2)))),
        ("Logit softcap", "softcap", dict(softcap=30.0)),
        ("Learned sinks (with gradient)", "sinks", dict(sinks=_sds(H))),
        ("Attention dropout (counter-based)", "dropout", dict(dropout_rate=0.1)),
        ("LSE output / merge_attention", "lse", dict(return_lse=True)),
        ("bfloat16 / float16 inputs", "bf16", dict(dtype=jnp.bfloat16)),
    ]


def _attention_problem_args(spec: dict):
    spec = dict(spec)
    B, T, H, D = 2, 64, 4, 64
    S, K, Dv = spec.pop("S", T), spec.pop("K", H), spec.pop("Dv", D)
    dt = spec.pop("dtype", jnp.float32)
    return (_sds(B, T, H, D, dtype=dt), _sds(B, S, K, D, dtype=dt), _sds(B, S, K, Dv, dtype=dt)), spec


def _serves(impl: str, platform: str, spec: dict) -> bool:
    import attn_jax as aj
    from attn_jax.softmax import ATTENTION

    if impl not in ATTENTION.names():
        return False
    (q, k, v), kw = _attention_problem_args(spec)
    return aj.explain(q, k, v, impl=impl, platform=platform, **kw).chosen[platform] == impl


def _decode_serves(feature: str, spec: dict) -> bool:
    """Whether the decode path (one new query over a KV cache) serves the row's feature."""
    from attn_jax import masks
    import attn_jax as aj
    from attn_jax.positional import LowRankBias
    from attn_jax.softmax import decode

    spec = dict(spec)
    B, S, H, D = 2, 64, 4, 64
    K, Dv, dt = spec.pop("K", H), spec.pop("Dv", D), spec.pop("dtype", jnp.float32)
    spec.pop("S", None)
    q, k, v = _sds(B, 1, H, D, dtype=dt), _sds(B, S, K, D, dtype=dt), _sds(B, S, K, Dv, dtype=dt)
    kw = {n: spec.pop(n) for n in ("sinks", "dropout_rate", "return_lse") if n in spec}
    spec.pop("softcap", None)  # a plain keyword of decode_attention, forwarded to attention
    if "bias" in spec:
        b = spec.pop("bias")
        if isinstance(b, LowRankBias):   # decode_attention takes no factors (fold them into the cache instead)
            return False
        kw["bias"] = _sds(1, H, 1, S) if isinstance(b, jax.ShapeDtypeStruct) else b
    if "mask" in spec:  # decode is causal already; other masks are given in cache coordinates
        spec.pop("mask")
        extra = {
            "causal": None,
            "sliding_window": None,
            "chunked": masks.chunked(16, offset=jnp.full((B,), S - 1, jnp.int32)),
            "prefix_lm": masks.prefix_lm(8, offset=jnp.full((B,), S - 1, jnp.int32)),
            "segments": masks.segments(jnp.ones((B, 1), jnp.int32), jnp.ones((B, S), jnp.int32)),
            "key_padding": None,  # the cache's own lengths
            "dense_mask": jnp.ones((1, 1, 1, S), bool),
        }[feature]
        if extra is not None:
            kw["mask"] = extra
        if feature == "sliding_window":
            kw["window"] = 16
    if spec:
        raise ValueError(f"feature matrix: decode probe does not understand {sorted(spec)}")
    lengths = jnp.full((B,), S, jnp.int32)
    decision = aj.explain(decode.decode_attention, q, k, v, lengths=lengths, platform="cpu", **kw)
    return decision.chosen["cpu"] is not None


def _mixer_serves(feature: str) -> bool:
    """Whether the registered "softmax" mixer claims ``feature`` (its SUPPORTED_FEATURES), or a mixer is
    registered under the feature's own name (``"relative"``: its own layer)."""
    try:
        mixers = importlib.import_module("attn_jax.mixers")
        cls = mixers.get("softmax")
    except (ImportError, ValueError, KeyError):
        return False
    return feature in getattr(cls, "SUPPORTED_FEATURES", frozenset()) or feature in mixers.names()


def positional_rows() -> list[tuple[str, str, Callable[[], bool]]]:
    """(row title, feature key, check) for every positional declaration that is not already an
    attention row (ALiBi and T5 are biases: rows of the attention matrix)."""
    from attn_jax.core import declaration

    declaration.load("attn_jax.positional")
    attention_keys = {feature for _, feature, _ in _attention_rows()}
    return [(d.title, d.name, lambda d=d: callable(d.op))
            for d in declaration.declarations("positional") if d.name not in attention_keys]


def rows() -> list[tuple[str, dict[str, str]]]:
    out = []
    for name, feature, spec in _attention_rows():
        cells = {
            "reference": _serves("reference", "cpu", spec),
            "xla": _serves("xla", "cpu", spec),
            "pallas-gpu": _serves("pallas", "cuda", spec),
            "pallas-tpu": _serves("pallas", "tpu", spec),
            "decode": _decode_serves(feature, spec),
            "mixer": _mixer_serves(feature),
        }
        out.append((name, {c: YES if v else NO for c, v in cells.items()}))
    for name, feature, check in positional_rows():
        ok = YES if check() else NO
        # Rotary / absolute schemes are elementwise functions applied to q, k or embeddings:
        # they run wherever XLA runs and need no kernel of their own.
        out.append((name, {"reference": ok, "xla": ok, "pallas-gpu": NA, "pallas-tpu": NA, "decode": ok,
                           "mixer": YES if _mixer_serves(feature) else NO}))
    return out


def markdown() -> str:
    lines = ["| feature | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for name, cells in rows():
        lines.append(f"| {name} | " + " | ".join(cells[c] for c in COLUMNS) + " |")
    return "\n".join(lines)


def linear_markdown() -> str:
    """The linear / recurrent matrix, read from :mod:`attn_jax.linear.catalog` (whose claimed
    forms tests/linear/test_catalog.py runs against each reference) and the registries."""
    from attn_jax import mixers
    from attn_jax.linear import catalog

    yes = lambda b: YES if b else NO
    lines = ["| mechanism | paper | " + " | ".join(LINEAR_COLUMNS) + " |",
             "|---|---|" + "---|" * len(LINEAR_COLUMNS)]
    registered = set(mixers.names())
    for m in catalog.CATALOG:
        cells = [", ".join(f"`{f}`" for f in m.forms),
                 yes(catalog.kernel_serves(m, "cuda")), yes(catalog.kernel_serves(m, "tpu")), yes(m.causal),
                 yes(m.noncausal), yes(m.segments), yes(m.initial_state),
                 f"`{m.mixer}`" if m.mixer in registered else NO]
        lines.append(f"| {m.name} | {m.paper} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def family_markers(family: str) -> tuple[str, str]:
    """The README markers around ``family``'s matrix."""
    return f"<!-- {family}-matrix:begin -->", f"<!-- {family}-matrix:end -->"


def family_markdown(family: str) -> str:
    """The matrix of one family (:data:`FAMILY_MATRICES`), one row per declaration, in declaration
    order: title, paper, functional op, claimed forms, directions, registered mixer."""
    from attn_jax import mixers
    from attn_jax.core import declaration

    declaration.load(f"attn_jax.{family}")
    registered = set(mixers.names())
    yes = lambda b: YES if b else NO
    lines = ["| " + " | ".join(FAMILY_COLUMNS) + " |", "|" + "---|" * len(FAMILY_COLUMNS)]
    for d in declaration.declarations(family):
        op = f"`aj.{family}.{d.op.__name__}`" if d.op is not None else NO
        forms = ", ".join(f"`{f}`" for f in d.forms) or NO
        lines.append(f"| {d.title} | {d.cite()} | {op} | {forms} | {yes(d.causal)} | {yes(d.bidirectional)} | "
                     + (f"`{d.name}`" if d.name in registered else NO) + " |")
    return "\n".join(lines)


def listing() -> str:
    """One line per declared mechanism (``python -m attn_jax.feature_matrix --list``): name,
    family, forms, directions, mixer, papers."""
    from attn_jax import mixers
    from attn_jax.core import declaration

    registered = set(mixers.names())
    lines = []
    for d in sorted(declaration.declarations(), key=lambda d: (d.family, d.name)):
        forms = ",".join(("reference",) + d.forms) if d.forms else "-"
        mixer = d.name if d.name in registered else "-"
        lines.append(f"{d.name:16} {d.family:10} {forms:34} {'/'.join(d.directions):20} mixer={mixer:15} {d.cite()}")
    return "\n".join(lines)


def replace_block(text: str, table: str, begin: str = BEGIN, end: str = END) -> str:
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"README has no {begin} ... {end} block")
    return pattern.sub(lambda _: f"{begin}\n{table}\n{end}", text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", metavar="README", help="rewrite the feature-matrix block of this file")
    ap.add_argument("--list", action="store_true", help="print one line per declared mechanism instead")
    args = ap.parse_args(argv)
    if args.list:
        print(listing())
        return
    table, linear_table = markdown(), linear_markdown()
    if args.write:
        with open(args.write) as f:
            text = f.read()
        text = replace_block(replace_block(text, table), linear_table, LINEAR_BEGIN, LINEAR_END)
        for family in FAMILY_MATRICES:
            text = replace_block(text, family_markdown(family), *family_markers(family))
        with open(args.write, "w") as f:
            f.write(text)
    print(table + "\n\n" + linear_table)


if __name__ == "__main__":
    main()

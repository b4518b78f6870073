"""The README feature matrix, computed from the dispatch registries so it cannot drift.

Each row is a feature posed as a concrete problem; each column asks a registry
whether an implementation serves it:

* ``reference`` / ``xla``: the ``attention`` registry's implementation of that
  name serves the problem when lowered for ``cpu``;
* ``pallas-gpu`` / ``pallas-tpu``: the ``pallas`` implementation serves it when
  lowered for ``cuda`` / ``tpu``;
* ``decode``: the decode path serves it (a one-token query over a KV cache);
* ``mixer``: a registered Flax mixer exposes it.

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


def _sds(*shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _attention_rows() -> list[tuple[str, dict]]:
    from attn_jax import masks
    from attn_jax.positional import ALiBi, T5RelativeBias, alibi_slopes

    B, T, H, D = 2, 64, 4, 64
    ids = jnp.ones((B, T), jnp.int32)
    return [
        ("Exact softmax attention (MHA)", dict()),
        ("GQA / MQA (grouped, no K/V repeat)", dict(K=1)),
        ("Dk ≠ Dv", dict(Dv=32)),
        ("T ≠ S (cross-attention)", dict(S=96)),
        ("Causal mask (bottom-right aligned)", dict(mask=masks.causal())),
        ("Sliding window (inclusive)", dict(mask=masks.causal() & masks.sliding_window(16))),
        ("Chunked local attention", dict(mask=masks.chunked(16) & masks.causal())),
        ("Prefix-LM", dict(mask=masks.prefix_lm(8))),
        ("Packed segments", dict(mask=masks.segments(ids) & masks.causal())),
        ("Key padding (lengths)", dict(mask=masks.key_padding(jnp.full((B,), T, jnp.int32)))),
        ("Dense boolean mask", dict(mask=jnp.ones((1, 1, T, T), bool))),
        ("Additive bias (dense, with dbias)", dict(bias=_sds(1, H, T, T))),
        ("ALiBi (evaluated per tile)", dict(bias=ALiBi(alibi_slopes(H)))),
        ("T5 relative bias (per tile, learned)", dict(bias=T5RelativeBias(jnp.zeros((32, H))))),
        ("Logit softcap", dict(softcap=30.0)),
        ("Learned sinks (with gradient)", dict(sinks=_sds(H))),
        ("Attention dropout (counter-based)", dict(dropout_rate=0.1)),
        ("LSE output / merge_attention", dict(return_lse=True)),
        ("bfloat16 / float16 inputs", dict(dtype=jnp.bfloat16)),
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


def _decode_serves(spec: dict) -> bool:
    try:
        decode = importlib.import_module("attn_jax.softmax.decode")
    except ImportError:
        return False
    supports = getattr(decode, "supports", None)
    return bool(supports and supports(**spec))


def _mixer_serves(spec: dict) -> bool:
    try:
        mixers = importlib.import_module("attn_jax.mixers")
    except ImportError:
        return False
    supports = getattr(mixers, "softmax_supports", None)
    return bool(supports and supports(**spec))


def _positional_rows() -> list[tuple[str, Callable[[], bool]]]:
    def has(*names):
        def check():
            mod = importlib.import_module("attn_jax.positional")
            return all(hasattr(mod, n) for n in names)
        return check

    return [
        ("RoPE (half-split / interleaved, partial, linear / NTK / YaRN)", has("apply_rope", "RopeScaling")),
        ("xPos", has("apply_xpos")),
        ("Sinusoidal and learned absolute embeddings",
         has("sinusoidal_embedding", "learned_absolute_embedding")),
    ]


def rows() -> list[tuple[str, dict[str, str]]]:
    out = []
    for name, spec in _attention_rows():
        cells = {
            "reference": _serves("reference", "cpu", spec),
            "xla": _serves("xla", "cpu", spec),
            "pallas-gpu": _serves("pallas", "cuda", spec),
            "pallas-tpu": _serves("pallas", "tpu", spec),
            "decode": _decode_serves(spec),
            "mixer": _mixer_serves(spec),
        }
        out.append((name, {c: YES if v else NO for c, v in cells.items()}))
    for name, check in _positional_rows():
        ok = YES if check() else NO
        # Rotary / absolute schemes are elementwise functions applied to q, k or embeddings:
        # they run wherever XLA runs and need no kernel of their own.
        out.append((name, {"reference": ok, "xla": ok, "pallas-gpu": NA, "pallas-tpu": NA, "decode": ok,
                           "mixer": NO if not _mixer_serves({"positional": name}) else YES}))
    return out


def markdown() -> str:
    lines = ["| feature | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for name, cells in rows():
        lines.append(f"| {name} | " + " | ".join(cells[c] for c in COLUMNS) + " |")
    return "\n".join(lines)


def replace_block(text: str, table: str) -> str:
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"README has no {BEGIN} ... {END} block")
    return pattern.sub(lambda _: f"{BEGIN}\n{table}\n{END}", text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", metavar="README", help="rewrite the feature-matrix block of this file")
    args = ap.parse_args(argv)
    table = markdown()
    if args.write:
        with open(args.write) as f:
            text = f.read()
        with open(args.write, "w") as f:
            f.write(replace_block(text, table))
    print(table)


if __name__ == "__main__":
    main()

"""Capture attention maps (and the residual stream) from a model without changing its code.

Softmax-family mixers (:class:`attn_jax.nn.MultiHeadAttention` and its subclasses) have an opt-in
``capture_maps`` hook (see :mod:`attn_jax.nn.attention`): :func:`capturing` turns it on for every
such layer of a model for the duration of a ``with`` block, and :func:`capture` /
:func:`capture_all` run the model once under one ``jax.jit`` and return the sown maps by layer
path (``"blocks/0/mixer"``).  With capture off (the default) the fast path is unchanged.

What is captured, per layer: ``weights [B, H, T, S]`` float32, the matrix ``W`` of the mixer's
attention ``o_h = W_h v`` (softmax probabilities for plain softmax, with ``logits`` the
pre-softmax scores, hidden pairs ``-inf``; the materialised weights of any other attention linear
in ``v``: sigmoid, ReLU/softplus, entmax, talking heads, CoPE, selective, ...), ``values``
``v [B, S, K, Dv]`` and ``output`` ``o [B, T, H, Dv]``.  ``check=True`` verifies ``W v == o``
for every layer (a mixer whose attention is not linear in ``v`` fails this with a ``ValueError``
naming it).

Linear / recurrent mixers (:class:`attn_jax.nn.linear_mixers.LinearAttentionMixer`): their
"attention" is the parallel form ``o_t = Σ_s W_ts v_s`` that the chunked and recurrent forms
compute without materialising (for normalised linear attention ``W_ts = φ(q_t)·φ(k_s) / Σ_{s'}
φ(q_t)·φ(k_s')``; for gated rules ``W_ts = q_t · diag(Π_{r=s+1..t} g_r) k_s``; for the delta rule
the same matrix exists because ``o`` stays linear in ``v``).  :func:`linear_attention_weights`
materialises it on short inputs by running the layer's rule on the identity value basis; inside a
:class:`~attn_jax.models.decoder_lm.TransformerBlock` :func:`capture_all` does so from the block's
normalised input.  A mixer with neither hook raises ``ValueError`` naming it (``others="skip"``
leaves it out).

``hidden=True`` also returns each block's residual-stream output ``[B, T, d]`` (for the
massive-activation statistics of :mod:`attn_jax.analysis.metrics`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from attn_jax.core.numerics import l2_normalize
from attn_jax.models.decoder_lm import TransformerBlock
from attn_jax.nn.attention import MultiHeadAttention
from attn_jax.nn.linear_mixers import LinearAttentionMixer

__all__ = ["Capture", "capturing", "capture", "capture_all", "attention_layers", "mixer_layers",
           "linear_attention_weights", "path_name"]


def path_name(path) -> str:
    """``("blocks", 0, "mixer") -> "blocks/0/mixer"`` (the model itself: ``""``)."""
    return "/".join(str(p) for p in path)


def attention_layers(model: nnx.Module) -> dict[str, MultiHeadAttention]:
    """Every softmax-family mixer of ``model`` (a :class:`MultiHeadAttention` or subclass) by path."""
    return {path_name(p): m for p, m in nnx.iter_modules(model) if isinstance(m, MultiHeadAttention)}


def mixer_layers(model: nnx.Module) -> dict[str, nnx.Module]:
    """Every token mixer of ``model`` by path: attention layers, linear mixers, and any other module
    with the protocol's ``init_cache`` (the ones capture cannot read)."""
    return {path_name(p): m for p, m in nnx.iter_modules(model)
            if isinstance(m, (MultiHeadAttention, LinearAttentionMixer)) or
            (p and callable(getattr(m, "init_cache", None)) and not hasattr(m, "blocks"))}


@contextlib.contextmanager
def capturing(model: nnx.Module) -> Iterator[dict[str, MultiHeadAttention]]:
    """Within the block every attention layer of ``model`` sows its maps (``capture_maps``); the
    previous settings are restored on exit.  Yields the layers by path."""
    layers = attention_layers(model)
    before = {p: m.capture_maps for p, m in layers.items()}
    try:
        for m in layers.values():
            m.capture_maps = True
        yield layers
    finally:
        for p, m in layers.items():
            m.capture_maps = before[p]


@dataclasses.dataclass
class Capture:
    """What :func:`capture_all` returns.

    Attributes:
      output: the model's output (as the model returns it).
      maps: layer path -> ``{"weights": [B, H, T, S], "values": [B, S, K, Dv], "output":
        [B, T, H, Dv]}`` (plus ``"logits" [B, H, T, S]`` for plain softmax layers), NumPy arrays.
      hidden: block path -> residual stream after the block ``[B, T, d]`` (``hidden=True`` only).
    """

    output: Any
    maps: dict[str, dict[str, np.ndarray]]
    hidden: dict[str, np.ndarray]

    def weights(self) -> dict[str, np.ndarray]:
        """Layer path -> ``weights [B, H, T, S]``."""
        return {p: m["weights"] for p, m in self.maps.items()}


def _activation(x, kind: str):
    """The linear mixer's q/k/v activation (its recipe names "silu" or "identity")."""
    return jax.nn.silu(x) if kind == "silu" else x


def linear_attention_weights(mixer: LinearAttentionMixer, x: Float[Array, "B T d"], *,
                             segment_ids=None) -> tuple[Float[Array, "B H T T"], Float[Array, "B T K Dv"],
                                                        Float[Array, "B T H Dv"]]:
    """``(weights [B, H, T, T], v, o)`` of a linear mixer on its input ``x``: ``o = W v`` is the
    rule's output before the output norm / gate, ``W`` its parallel (materialised) form, obtained
    by running the rule on the identity value basis.  Short inputs only (``W`` is ``T x T``).

    Raises ``ValueError`` naming the mechanism when its rule is not linear in ``v`` through the
    layer's own value path (Mamba-2's ``Δ``-scaled values).
    """
    if not isinstance(mixer, LinearAttentionMixer):
        raise TypeError(f"mixer: expected a LinearAttentionMixer, got {type(mixer).__name__}")
    name = mixer.decl.name
    if mixer.decay is not None and getattr(mixer.decay, "scale_values", False):
        raise ValueError(f"mixer: the {name!r} mixer scales its values by Δ inside the layer; its weights are not "
                         f"exposed by the analysis toolkit")
    dt = mixer.dtype
    x = jnp.asarray(x).astype(dt)
    B, T = x.shape[:2]
    q = jnp.einsum("btd,dhf->bthf", x, mixer.w_q[...].astype(dt))
    k = jnp.einsum("btd,dhf->bthf", x, mixer.w_k[...].astype(dt))
    v = jnp.einsum("btd,dhf->bthf", x, mixer.w_v[...].astype(dt))
    if mixer.use_conv:
        q = mixer.conv_q(q, segment_ids=segment_ids)[0]
        k = mixer.conv_k(k, segment_ids=segment_ids)[0]
        v = mixer.conv_v(v, segment_ids=segment_ids)[0]
    q, k = _activation(q, mixer.qk_activation), _activation(k, mixer.qk_activation)
    v = _activation(v, mixer.v_activation)
    if mixer.qk_l2:
        q, k = l2_normalize(q), l2_normalize(k)
    log_g = None if mixer.decay is None else mixer.decay(x)[0]
    K = k.shape[2]
    eye = jnp.broadcast_to(jnp.eye(T, dtype=jnp.float32)[None, :, None, :], (B, T, K, T))
    f32 = jnp.float32
    if mixer.features is not None:
        if mixer.features.uses_positions:
            raise ValueError(f"mixer: the {name!r} feature map reads positions; its weights are not exposed by the "
                             f"analysis toolkit")
        qf, kf, v = mixer.features(q.astype(f32), k.astype(f32), v.astype(f32), None)
    else:
        qf, kf = q, k
    beta = None if mixer.write_strength is None else mixer.write_strength(x)
    w, _ = mixer.rule(qf, kf, eye.astype(qf.dtype), log_g, beta, None, segment_ids, False)
    o, _ = mixer.rule(qf, kf, v.astype(qf.dtype), log_g, beta, None, segment_ids, False)
    return w.astype(f32).transpose(0, 2, 1, 3), v, o


def _flat(state) -> dict[tuple, Any]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state),
                                                           is_leaf=lambda x: isinstance(x, tuple))[0]:
        out[tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)] = leaf
    return out


_SOWN = ("attention_weights", "attention_logits", "attention_values", "attention_output")


def _run(graphdef, state, args, array_kw, *, static_kw, hidden: bool):
    model = nnx.merge(graphdef, state)
    kw = {**array_kw, **dict(static_kw)}
    out, inter = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(*args, **kw)
    flat = _flat(inter)
    maps: dict[str, dict] = {}
    for path, value in flat.items():
        if path and path[-1] in _SOWN:
            maps.setdefault(path_name(path[:-1]), {})[path[-1][len("attention_"):]] = value[0]
    modules = dict(nnx.iter_modules(model))
    hid = {}
    for path, m in modules.items():
        if isinstance(m, TransformerBlock):
            if hidden:
                hid[path_name(path)] = flat[path + ("__call__",)][0][0]
            mixer = m.mixer
            if isinstance(mixer, LinearAttentionMixer):
                x_in = flat[path + ("norm_mixer", "__call__")][0]
                w, v, o = linear_attention_weights(mixer, x_in, segment_ids=kw.get("segment_ids"))
                maps[path_name(path + ("mixer",))] = {"weights": w, "values": v, "output": o}
    return out, maps, hid


_JITTED: dict = {}


def _jitted(compiler_options: dict | None):
    key = tuple(sorted((compiler_options or {}).items()))
    if key not in _JITTED:
        _JITTED[key] = jax.jit(_run, static_argnames=("graphdef", "static_kw", "hidden"),
                               compiler_options=compiler_options)
    return _JITTED[key]


def capture_all(model: nnx.Module, *args, hidden: bool = False, others: str = "raise", check: bool = True,
                compiler_options: dict | None = None, **kwargs) -> Capture:
    """Run ``model(*args, **kwargs)`` once (one ``jax.jit``) with every attention layer capturing;
    see the module docstring and :class:`Capture`.

    Args:
      model: any NNX model (or a single mixer).
      hidden: also return each TransformerBlock's residual-stream output.
      others: ``"raise"`` (default) when a mixer's weights cannot be captured (``ValueError`` naming
        its path and type), ``"skip"`` to leave it out.
      check: verify ``weights @ values == output`` per layer (``ValueError`` naming the layer).
      compiler_options: XLA options of the one compiled program (e.g. the test kit's ``FAST_COMPILE``).
      kwargs: array keyword arguments are traced; the others (``deterministic=True``, ...) are static.
    """
    if others not in ("raise", "skip"):
        raise ValueError(f"others: expected 'raise' or 'skip', got {others!r}")
    for path, m in mixer_layers(model).items():
        if isinstance(m, MultiHeadAttention):
            continue
        if isinstance(m, LinearAttentionMixer):
            parent = path.rsplit("/", 1)[0] if "/" in path else ""
            blocks = {path_name(p) for p, b in nnx.iter_modules(model) if isinstance(b, TransformerBlock)}
            if parent in blocks:
                continue
        if others == "raise":
            raise ValueError(f"model: the mixer at {path or '<root>'!r} ({type(m).__name__}"
                             f"{' ' + repr(m.decl.name) if hasattr(m, 'decl') else ''}) exposes no attention "
                             f"weights to capture (softmax-family mixers, and linear mixers inside a "
                             f"TransformerBlock, do); pass others='skip' to leave it out")
    array_kw = {k: v for k, v in kwargs.items() if isinstance(v, (jax.Array, np.ndarray))}
    static_kw = tuple(sorted((k, v) for k, v in kwargs.items() if k not in array_kw))
    with capturing(model):
        graphdef, state = nnx.split(model)
        out, maps, hid = _jitted(compiler_options)(graphdef, state, tuple(args), array_kw, static_kw=static_kw,
                                                   hidden=hidden)
    maps = jax.tree.map(np.asarray, maps)
    if check:
        for path, m in maps.items():
            _check_linear(path, m)
    return Capture(output=out, maps=maps, hidden=jax.tree.map(np.asarray, hid))


def _check_linear(path: str, m: dict, tol: float = 1e-3) -> None:
    w, v, o = (np.asarray(m[k], np.float64) for k in ("weights", "values", "output"))
    B, H, T, S = w.shape
    K = v.shape[2]
    recon = np.einsum("bkgts,bskd->btkgd", w.reshape(B, K, H // K, T, S), v).reshape(o.shape)
    err = np.linalg.norm(recon - o) / max(np.linalg.norm(o), 1e-30)
    if not np.isfinite(err) or err > tol:
        raise ValueError(f"model: the captured weights of {path!r} do not reproduce its attention output "
                         f"(relative error {err:.2e} > {tol}): its attention is not linear in v")


def capture(model: nnx.Module, *args, **kwargs) -> dict[str, np.ndarray]:
    """``{layer_path: weights [B, H, T, S]}`` of ``model(*args, **kwargs)``; see :func:`capture_all`
    (which it calls with the same keyword options)."""
    return capture_all(model, *args, **kwargs).weights()

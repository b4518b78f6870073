"""The catalogue of linear / recurrent mechanisms: what each computes, which forms it has, which
mixer wraps it.  The README's linear-attention matrix and the catalogue-wide parity tests
(``tests/linear/test_catalog.py``) both read this list, so a form that is claimed is a form
that is run against the reference.

An entry's ``call(impl, inputs, **kw)`` runs the mechanism on the standard inputs of
:func:`standard_inputs` (q, k, v, a vector gate, a scalar gate, beta, a state) with one ``impl``
and returns the output array; ``forms`` lists the ``impl`` names it claims besides
``"reference"``; ``causal`` / ``noncausal`` say which directions it defines.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import jax
import jax.numpy as jnp

__all__ = ["Mechanism", "CATALOG", "standard_inputs", "get"]


@dataclass(frozen=True)
class Mechanism:
    name: str
    paper: str
    call: Callable             # (impl, inputs, *, causal, segment_ids, initial_state) -> o
    forms: tuple[str, ...]     # impls besides "reference"
    causal: bool = True
    noncausal: bool = False
    segments: bool = True
    initial_state: bool = True
    mixer: str | None = None
    kernel_gate: str | None = None   # gate kind it hands the chunked Pallas kernel ("none"/"scalar"/"vector")
    notes: str = ""


def standard_inputs(key, B=2, T=37, H=4, K=2, Dk=12, Dv=20, dtype=jnp.float32):
    ks = jax.random.split(key, 7)
    q = jax.random.normal(ks[0], (B, T, H, Dk), dtype)
    k = jax.random.normal(ks[1], (B, T, K, Dk), dtype)
    v = jax.random.normal(ks[2], (B, T, K, Dv), dtype)
    return {
        "q": q, "k": k, "v": v,
        "log_g": -jax.random.uniform(ks[3], (B, T, H, Dk), dtype, 0.01, 1.0),
        "log_a": -jax.random.uniform(ks[4], (B, T, H), dtype, 0.01, 1.0),
        "beta": jax.random.uniform(ks[5], (B, T, H), dtype, 0.05, 0.95),
        "h0": jax.random.normal(ks[6], (B, H, Dk, Dv), dtype),
    }


def _linear():
    return importlib.import_module("attn_jax.linear")


def _unit_keys(k):
    return k / jnp.linalg.norm(k, axis=-1, keepdims=True)


def _gated(fn_name: str, *gate_names: str, normalize_keys: bool = False, **fixed):
    def call(impl, x, *, causal=True, segment_ids=None, initial_state=None):
        fn = getattr(_linear(), fn_name)
        kw = dict(fixed, impl=impl, segment_ids=segment_ids, initial_state=initial_state)
        if not causal:
            kw["causal"] = False
        k = _unit_keys(x["k"]) if normalize_keys else x["k"]
        return fn(x["q"], k, x["v"], *(x[g] for g in gate_names), **kw)[0]
    return call


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _feature_map(name: str, d: int):
    """A named feature map (learned / random ones get fixed weights from fixed keys)."""
    fm = importlib.import_module("attn_jax.linear.feature_maps")
    if name == "performer":
        proj = fm.orthogonal_random_projection(jax.random.key(7), 24, d)
        return lambda x: fm.performer_features(x, proj.astype(x.dtype))
    if name == "hedgehog":
        W = jax.random.normal(jax.random.key(8), (d, 8)) / d ** 0.5
        return lambda x: fm.hedgehog(x, W.astype(x.dtype))
    return name


def _with_normaliser(h0):
    """A state with a (positive) normaliser column, as the normalised forms carry it."""
    return jnp.concatenate([h0, jnp.abs(h0[..., :1]) + 1.0], axis=-1)


def _feature_state(h0, feature_dim: int):
    """A normalised-form state ``[B, H, D', Dv + 1]`` derived deterministically from the standard
    ``h0 [B, H, Dk, Dv]``: ``h0`` itself when ``D' == Dk``, else a fixed projection of it
    (so gradients w.r.t. ``h0`` still check the state path)."""
    Dk = h0.shape[2]
    if feature_dim != Dk:
        P = jax.random.normal(jax.random.key(11), (feature_dim, Dk)).astype(h0.dtype) / Dk ** 0.5
        h0 = jnp.einsum("fd,bhdv->bhfv", P, h0)
    return _with_normaliser(h0)


def _feature_dim(fm, q) -> int:
    phi = importlib.import_module("attn_jax.linear.feature_maps").resolve_feature_map(fm)
    return jax.eval_shape(phi, q).shape[-1]


def _normalised(fm_name: str):
    def call(impl, x, *, causal=True, segment_ids=None, initial_state=None):
        lin = importlib.import_module("attn_jax.linear.linear_attention")
        fm = _feature_map(fm_name, x["q"].shape[-1])
        kw = dict(feature_map=fm, causal=causal, segment_ids=segment_ids)
        if initial_state is not None:
            kw["initial_state"] = _feature_state(initial_state, _feature_dim(fm, x["q"]))
        if impl == "reference":
            return _first(lin.linear_attention_reference(x["q"], x["k"], x["v"], **kw))
        return _first(lin.linear_attention(x["q"], x["k"], x["v"], impl=impl, **kw))
    return call


def _based(impl, x, *, causal=True, segment_ids=None, initial_state=None):
    based = importlib.import_module("attn_jax.linear.based")
    qf, kf = x["q"][..., :6], x["k"][..., :6]   # the small feature dim d' of the linear part
    if impl == "reference":
        o = based.based_attention_reference(qf, kf, x["q"], x["k"], x["v"], window=8, segment_ids=segment_ids)
    else:
        o = based.based_attention(qf, kf, x["q"], x["k"], x["v"], window=8, segment_ids=segment_ids, impl=impl)
    return o[0] + o[1]


def _cosformer_dense(x, *, causal, segment_ids, initial_state, eps=1e-6):
    """cosFormer written densely (``cos(π(i−j)/2M)`` weights, ``M = T``) with the initial state
    added explicitly: ``S_0`` is a state of the cos/sin features in this call's position frame,
    so a first-document query ``i`` reads ``[φq_i cos(πi/2M), φq_i sin(πi/2M)] · S_0``
    (numerator columns and, last column, normaliser) — the definition of
    :func:`cosformer_attention` with ``initial_state``."""
    import math
    from attn_jax.linear.common import expand_kv_heads, segment_layout
    q, k, v = x["q"], x["k"], x["v"]
    B, T, H = q.shape[:3]
    fq, fk = jax.nn.relu(q), expand_kv_heads(jax.nn.relu(k), H)
    lay = segment_layout(segment_ids, B, T)
    vis = (lay.doc[:, :, None] == lay.doc[:, None, :]) & lay.valid[:, None, :] & lay.valid[:, :, None]
    if causal:
        vis = vis & jnp.tril(jnp.ones((T, T), bool))
    pos = jnp.arange(T, dtype=q.dtype)
    w = jnp.cos((math.pi / 2) * (pos[:, None] - pos[None, :]) / T)
    a = jnp.where(vis[:, None], jnp.einsum("bihd,bjhd->bhij", fq, fk) * w, 0.0)
    vv = jnp.where(lay.valid[:, :, None, None], expand_kv_heads(v, H), 0.0)
    num = jnp.einsum("bhij,bjhv->bihv", a, vv)
    den = jnp.moveaxis(a.sum(-1), 1, 2)
    if initial_state is not None:
        ang = (math.pi / 2) * pos / T
        psi = jnp.concatenate([fq * jnp.cos(ang)[None, :, None, None], fq * jnp.sin(ang)[None, :, None, None]], -1)
        r = jnp.where(((lay.doc == 0) & lay.valid)[:, :, None, None],
                      jnp.einsum("bthf,bhfv->bthv", psi, initial_state), 0.0)
        num, den = num + r[..., :-1], den + r[..., -1]
    den = den[..., None] + eps
    return jnp.where(lay.valid[:, :, None, None], num / jnp.where(den == 0, 1.0, den), 0.0)


def _cosformer(impl, x, *, causal=True, segment_ids=None, initial_state=None):
    lin = importlib.import_module("attn_jax.linear.linear_attention")
    h0 = None if initial_state is None else _feature_state(initial_state, 2 * x["q"].shape[-1])
    if impl == "reference":
        if h0 is None:
            return _first(lin.cosformer_attention_reference(x["q"], x["k"], x["v"], causal=causal,
                                                            segment_ids=segment_ids))
        return _cosformer_dense(x, causal=causal, segment_ids=segment_ids, initial_state=h0)
    return _first(lin.cosformer_attention(x["q"], x["k"], x["v"], causal=causal, segment_ids=segment_ids,
                                          initial_state=h0, impl=impl))


def _log_normal(impl, x, *, causal=True, segment_ids=None, initial_state=None):
    lln = importlib.import_module("attn_jax.linear.log_normal")
    kw = dict(alpha=0.4, beta=0.4, causal=causal, segment_ids=segment_ids, eps=1e-15)  # the fast form shifts φ by its max, which rescales eps
    h0 = None if initial_state is None else _feature_state(initial_state, x["q"].shape[-1])
    if impl == "reference":
        if h0 is None:
            return _first(lln.log_normal_attention_reference(x["q"], x["k"], x["v"], **kw))
        # log_normal_attention_reference has no initial_state: the same unshifted formula through
        # the dense linear-attention reference, which folds the state in explicitly
        lin = importlib.import_module("attn_jax.linear.linear_attention")
        return _first(lin.linear_attention_reference(
            x["q"], x["k"], x["v"], feature_map=(lambda z: jnp.exp(0.4 * z), lambda z: jnp.exp(0.4 * z)),
            normalize=True, eps=1e-15, scale=1.0, causal=causal, segment_ids=segment_ids, initial_state=h0))
    return _first(lln.log_normal_attention(x["q"], x["k"], x["v"], impl=impl, initial_state=h0, **kw))


def _efficient(impl, x, *, causal=False, segment_ids=None, initial_state=None):
    eff = importlib.import_module("attn_jax.linear.efficient_attention")
    if impl == "reference":
        return _first(eff.efficient_attention_reference(x["q"], x["k"], x["v"], segment_ids=segment_ids))
    return _first(eff.efficient_attention(x["q"], x["k"], x["v"], segment_ids=segment_ids, impl=impl))


def _agent(impl, x, *, causal=False, segment_ids=None, initial_state=None):
    agent = importlib.import_module("attn_jax.linear.agent")
    kw = dict(num_agents=5)
    if segment_ids is not None:
        kw.update(segment_ids=segment_ids, max_segments=3)
    if impl == "reference":
        return _first(agent.agent_attention_reference(x["q"], x["k"], x["v"], **kw))
    return _first(agent.agent_attention(x["q"], x["k"], x["v"], impl=impl, **kw))


def _flow_state(h0):
    """A :class:`~attn_jax.linear.flowformer.FlowState` derived deterministically (and
    differentiably) from the standard ``h0 [B, H, Dk, Dv]`` (``Dv >= 4``): positive prefix sums
    of a prefix of ``count`` tokens, the value state ``h0`` itself."""
    flow = importlib.import_module("attn_jax.linear.flowformer")
    count = 4.0 + jnp.abs(h0[..., 0, 0])                                          # [B, H]
    part = lambda c: count[..., None] * jax.nn.sigmoid(h0[..., c])               # [B, H, Dk]
    return flow.FlowState(sum_q=part(0), sum_k=part(1), flow_k=part(2), flow_q=part(3),
                          lse=jnp.log(count) + 0.3 * h0[..., 1, 0], kv=h0, count=count)


def _flow(impl, x, *, causal=True, segment_ids=None, initial_state=None):
    flow = importlib.import_module("attn_jax.linear.flowformer")
    kw = dict(causal=causal, segment_ids=segment_ids,
              initial_state=None if initial_state is None else _flow_state(initial_state))
    if impl == "reference":
        return _first(flow.flow_attention_reference(x["q"], x["k"], x["v"], **kw))
    return _first(flow.flow_attention(x["q"], x["k"], x["v"], impl=impl, **kw))


def _mega_ema(impl, x, *, causal=True, segment_ids=None, initial_state=None):
    """Mega's damped EMA on the values viewed as ``[B, T, K * Dv]`` channels, ``N = 3`` EMA dims,
    parameters derived deterministically from the inputs' shapes (the mixer learns them)."""
    mega = importlib.import_module("attn_jax.linear.mega")
    v = x["v"]
    B, T, K, Dv = v.shape
    D, N = K * Dv, 3
    grid = jnp.linspace(0.0, 1.0, D * N, dtype=v.dtype).reshape(D, N)
    alpha, delta = 0.1 + 0.8 * grid, 0.9 - 0.7 * grid
    beta, eta = 1.0 - 2.0 * grid, jnp.cos(7.0 * grid)
    fn = mega.damped_ema_reference if impl == "reference" else mega.damped_ema_parallel
    return fn(v.reshape(B, T, D), alpha, delta, beta, eta, segment_ids=segment_ids)[0]


CATALOG: list[Mechanism] = [
    Mechanism("Linear attention, identity map, unnormalised", "Katharopoulos et al. 2020, arXiv:2006.16236",
              _gated("gated_linear_attention"), ("chunk", "parallel", "recurrent"), noncausal=True,
              kernel_gate="none"),
    Mechanism("Linear attention, elu+1 map, normalised", "Katharopoulos et al. 2020, arXiv:2006.16236",
              _normalised("elu"), ("chunk", "parallel", "recurrent"), noncausal=True, mixer="linear",
              kernel_gate="none"),
    Mechanism("ReLU feature map", "(feature map; Qin et al. 2022, arXiv:2202.08791 use it in cosFormer)",
              _normalised("relu"), ("chunk", "parallel", "recurrent"), noncausal=True),
    Mechanism("DPFP feature map", "Schlag et al. 2021, arXiv:2102.11174", _normalised("dpfp"),
              ("chunk", "parallel", "recurrent"), noncausal=True, mixer="dpfp"),
    Mechanism("Performer FAVOR+ (positive orthogonal random features)", "Choromanski et al. 2020, arXiv:2009.14794",
              _normalised("performer"), ("chunk", "parallel", "recurrent"), noncausal=True, mixer="performer",
              notes="projection drawn from an explicit key"),
    Mechanism("Hedgehog (learnable softmax-mimicking map)", "Zhang et al. 2024, arXiv:2402.04347",
              _normalised("hedgehog"), ("chunk", "parallel", "recurrent"), noncausal=True, mixer="hedgehog",
              notes="distillation loss: feature_maps.hedgehog_distillation_loss"),
    Mechanism("BASED (Taylor-2 linear + sliding-window softmax)", "Arora et al. 2024, arXiv:2402.18668",
              _based, ("chunk", "parallel", "recurrent"), initial_state=False, mixer="based"),
    Mechanism("cosFormer (ReLU + cos re-weighting)", "Qin et al. 2022, arXiv:2202.08791", _cosformer,
              ("chunk", "parallel", "recurrent"), noncausal=True, mixer="cosformer",
              notes="initial_state is a state in the call's position frame (positions restart at 0)"),
    Mechanism("Linear log-normal attention", "Nahshan et al. 2023, arXiv:2311.13541", _log_normal,
              ("chunk", "parallel", "recurrent"), noncausal=True, mixer="lln",
              notes="fixed alpha, beta (the mixer: RMS-normalised q, k and the unit-variance moment match)"),
    Mechanism("Efficient Attention (softmax over features / positions)", "Shen et al. 2021, arXiv:1812.01243",
              _efficient, ("chunk",), causal=False, noncausal=True, initial_state=False, mixer="efficient"),
    Mechanism("Agent attention", "Han et al. 2024, arXiv:2312.08874", _agent, ("auto",), causal=False,
              noncausal=True, initial_state=False, mixer="agent",
              notes="packed documents via segment_ids + static max_segments (more documents: NaN row)"),
    Mechanism("Flowformer (flow conservation)", "Wu et al. 2022, arXiv:2202.06258", _flow, ("chunk", "recurrent"),
              noncausal=True, mixer="flow", notes="recurrent = scan of flow_attention_step; non-causal S != T without segments"),
    Mechanism("RetNet retention (multi-scale decay)", "Sun et al. 2023, arXiv:2307.08621",
              _gated("retention"), ("chunk", "parallel", "recurrent"), mixer="retnet", kernel_gate="scalar"),
    Mechanism("Lightning attention 1/2 (intra/inter-block tiling)", "Qin et al. 2024, arXiv:2401.04658",
              _gated("lightning_attention"), ("chunk", "parallel", "recurrent"), mixer="lightning", kernel_gate="scalar"),
    Mechanism("Scalar data-dependent decay (Mamba-2 SSD)", "Dao & Gu 2024, arXiv:2405.21060",
              _gated("ssd", "log_a"), ("chunk", "parallel", "recurrent"), mixer="ssd", kernel_gate="scalar"),
    Mechanism("GLA (vector gates, secondary chunking)", "Yang et al. 2023, arXiv:2312.06635",
              _gated("gla", "log_g"), ("chunk", "parallel", "recurrent"), mixer="gla", kernel_gate="vector"),
    Mechanism("Mega: damped multi-dimensional EMA (+ chunked gated attention in the mixer)",
              "Ma et al. 2022, arXiv:2209.10655", _mega_ema, ("parallel",), initial_state=False, mixer="mega",
              notes="EMA forms: scan (reference), parallel (associative scan), fft (no segments; tests/linear/test_mega.py)"),
    Mechanism("DeltaNet (delta rule, WY/UT chunking)", "Schlag et al. 2021, arXiv:2102.11174; Yang et al. 2024, "
              "arXiv:2406.06484", _gated("delta_rule", "beta", normalize_keys=True), ("chunk", "parallel", "recurrent"), mixer="deltanet",
              notes="keys L2-normalised by the caller"),
    Mechanism("Gated DeltaNet", "Yang, Kautz, Hatamizadeh 2024, arXiv:2412.06464",
              _gated("gated_delta_rule", "beta", "log_a", normalize_keys=True), ("chunk", "parallel", "recurrent"),
              mixer="gated_deltanet"),
]


def kernel_serves(m: Mechanism, platform: str) -> bool:
    """Whether ``impl="auto"`` of the gated engine picks the Pallas kernel for ``m`` on ``platform``
    (a causal call without segments, B=2 T=256 H=4 D=64 float32)."""
    if m.kernel_gate is None:
        return False
    from attn_jax.linear.gated import explain_gated

    sds = jax.ShapeDtypeStruct
    x = sds((2, 256, 4, 64), jnp.float32)
    g = {"none": None, "scalar": sds((2, 256, 4), jnp.float32), "vector": x}[m.kernel_gate]
    return explain_gated(x, x, x, g, platform=platform).chosen[platform] == "pallas"


def get(name: str) -> Mechanism:
    for m in CATALOG:
        if m.name == name:
            return m
    raise ValueError(f"name: unknown mechanism {name!r}; known: {[m.name for m in CATALOG]}")

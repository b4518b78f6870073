"""Dispatch: reasons, ordered fallback, decisions by the lowering platform (checked with jax.export)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import attn_jax as aj
from attn_jax import masks
from attn_jax.core.dispatch import Registry


def make_registry():
    reg = Registry("toy")
    reg.register("gpu_only", lambda p, x: x * 2, lambda plat, p: [] if plat == "cuda" else [f"needs cuda, not {plat}"])
    reg.register("small_only", lambda p, x: x + 1, lambda plat, p: [] if p < 10 else [f"size {p} >= 10"])
    reg.register("anything", lambda p, x: x - 1, lambda plat, p: [], auto=False)
    return reg


def test_auto_picks_first_that_serves_per_platform():
    reg = make_registry()
    d = reg.decide("auto", 3)
    assert d.chosen == {"cpu": "small_only", "cuda": "gpu_only", "rocm": "small_only", "tpu": "small_only"}
    assert "needs cuda, not cpu" in str(d)


def test_explicit_impl_that_cannot_serve_raises_with_all_reasons():
    reg = make_registry()
    with pytest.raises(ValueError, match=r"(?s)no implementation.*small_only: size 12 >= 10"):
        reg.call(["small_only"], 12, jnp.ones(2))
    with pytest.raises(ValueError, match=r"(?s)gpu_only: needs cuda, not cpu.*small_only: size 50 >= 10"):
        reg.call("auto", 50, jnp.ones(2))


def test_sequence_is_tried_in_order_and_non_auto_impls_are_opt_in():
    reg = make_registry()
    assert reg.decide(["anything", "small_only"], 1).chosen["cpu"] == "anything"
    assert reg.decide("auto", 20).chosen["cpu"] is None
    np.testing.assert_array_equal(reg.call(["small_only", "anything"], 20, jnp.ones(2)), jnp.zeros(2))


def test_decision_follows_the_lowering_platform_not_the_devices():
    reg = make_registry()
    f = jax.jit(lambda x: reg.call("auto", 3, x))
    np.testing.assert_array_equal(f(jnp.ones(2)), 2 * jnp.ones(2))  # cpu: small_only (+1)
    shape = jax.ShapeDtypeStruct((2,), jnp.float32)
    cuda_text = export.export(f, platforms=["cuda"])(shape).mlir_module()
    cpu_text = export.export(f, platforms=["cpu"])(shape).mlir_module()
    assert "stablehlo.multiply" in cuda_text and "stablehlo.add" not in cuda_text  # gpu_only: x * 2
    assert "stablehlo.add" in cpu_text and "stablehlo.multiply" not in cpu_text    # small_only: x + 1


def test_platform_that_no_impl_serves_raises_at_lowering():
    reg = Registry("toy2")
    reg.register("gpu_only", lambda p, x: x * 2, lambda plat, p: [] if plat == "cuda" else [f"needs cuda, not {plat}"])
    f = jax.jit(lambda x: reg.call("gpu_only", None, x))
    export.export(f, platforms=["cuda"])(jax.ShapeDtypeStruct((2,), jnp.float32))  # lowers fine for cuda
    with pytest.raises(ValueError, match="needs cuda, not cpu"):
        f(jnp.ones(2))  # lowering for this CPU machine raises our reasons
    with pytest.raises(ValueError, match="needs cuda, not tpu"):
        export.export(f, platforms=["tpu"])(jax.ShapeDtypeStruct((2,), jnp.float32))


def test_attention_explain_reports_reasons():
    q = jax.ShapeDtypeStruct((1, 8, 2, 16), jnp.float32)
    d = aj.explain(q, q, q, mask=masks.causal(), softcap=3.0)
    text = str(d)
    assert "cuDNN runs only on CUDA GPUs (lowering platform 'cpu')" in text
    assert "softcap is not supported" in text
    assert d.chosen["cpu"] is not None
    d = aj.explain(q, q, q, impl="cudnn", platform="cuda")
    assert d.chosen == {"cuda": None}
    assert "float16/bfloat16" in str(d)


def test_cudnn_refuses_misaligned_causal_and_unsupported_features_with_reasons():
    q = jax.ShapeDtypeStruct((1, 4, 2, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 16, 2, 64), jnp.bfloat16)
    d = aj.explain(q, kv, kv, mask=masks.causal(), impl="cudnn", platform="cuda")
    assert d.chosen["cuda"] is None and "top-left aligned" in str(d)
    d = aj.explain(q, kv, kv, mask=masks.causal(offset=0), impl="cudnn", platform="cuda")
    # On this CPU-only machine the only remaining reason is the missing cuDNN install.
    assert d.chosen["cuda"] is None and str(d).count("cannot serve") == 1 and "cuDNN is not installed" in str(d)
    d = aj.explain(q, kv, kv, mask=masks.sliding_window(3), impl="cudnn", platform="cuda")
    assert d.chosen["cuda"] is None and "mean(V)" in str(d)
    q = jnp.zeros((1, 4, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="cuDNN runs only on CUDA GPUs"):
        aj.attention(q, q, q, impl="cudnn")
    # auto on bf16 must still work on a machine without cuDNN (the cuda branch is not traced).
    assert aj.attention(q, q, q, mask=masks.causal()).shape == q.shape


def test_unservable_branch_survives_grad_and_vmap_until_lowering():
    reg = Registry("toy3")
    reg.register("gpu_only", lambda p, x: jnp.sin(x), lambda plat, p: [] if plat == "cuda" else ["needs cuda"])
    f = lambda x: reg.call("gpu_only", None, x).sum()
    shape = jax.ShapeDtypeStruct((3, 2), jnp.float32)
    export.export(jax.jit(jax.grad(f)), platforms=["cuda"])(shape)
    export.export(jax.jit(jax.vmap(jax.grad(f))), platforms=["cuda"])(shape)
    with pytest.raises(ValueError, match="needs cuda"):
        jax.jit(jax.grad(f))(jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="needs cuda"):
        jax.jit(jax.vmap(f))(jnp.ones((3, 2)))


def test_one_explain_for_attention_and_decode():
    import attn_jax as aj
    from attn_jax.softmax.decode import decode_attention

    q = jax.ShapeDtypeStruct((2, 1, 4, 16), jnp.float32)
    kv = jax.ShapeDtypeStruct((2, 32, 2, 16), jnp.float32)
    lengths = jnp.array([5, 32], jnp.int32)
    assert aj.explain(q, kv, kv, platform="cpu").chosen == aj.explain(aj.attention, q, kv, kv, platform="cpu").chosen
    d = aj.explain(decode_attention, q, kv, kv, lengths=lengths, num_splits=4, platform="cpu")
    assert d.op == "decode_attention" and d.chosen == {"cpu": "split_k"}
    d = aj.explain(decode_attention, q, kv, kv, lengths=lengths, platform="cpu")
    assert d.chosen == {"cpu": "direct"} and "num_splits not given" in str(d)
    with pytest.raises(ValueError, match="has no dispatch to explain; explainable ops: .*decode_attention"):
        aj.explain(aj.merge_attention, [])

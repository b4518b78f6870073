"""attn_jax.analysis.heads: masking a head == removing it; importance == finite differences of the
loss in the mask; attention gradients == the hand-derived ∂f/∂A of one layer."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attn_jax import mixers
from attn_jax.analysis import heads, metrics
from attn_jax.core import testing as tk
from attn_jax.models import DecoderConfig, DecoderLM
from attn_jax.nn.attention import HeadMask

B, T, D, H = 2, 6, 16, 4
FAST = dict(compiler_options=tk.FAST_COMPILE)


def _x(seed):
    return jax.random.normal(jax.random.key(seed), (B, T, D))


def test_pruning_by_mask_equals_removing_the_head():
    full = tk.build_module(mixers.get("softmax"), D, H, head_dim=4)
    keep = np.array([0, 1, 3])
    small = tk.build_module(mixers.get("softmax"), D, 3, head_dim=4)
    small.w_q[...] = full.w_q[...][:, keep]
    small.w_k[...] = full.w_k[...][:, keep]
    small.w_v[...] = full.w_v[...][:, keep]
    small.w_o[...] = full.w_o[...][keep]
    with heads.head_masks(full):
        heads.set_head_mask(full, {"": [1.0, 1.0, 0.0, 1.0]})
        gf, sf = nnx.split(full)
        gs, ss = nnx.split(small)
        y_masked, y_small = tk.fast_jit(lambda a, b, x: (nnx.merge(gf, a)(x)[0], nnx.merge(gs, b)(x)[0]))(sf, ss, _x(0))
    tk.assert_close(y_masked, y_small, name="masked head vs removed head")
    assert full.head_mask is None                          # the hook is removed after the block


def test_importance_is_the_mask_gradient_and_the_pruning_curve_uses_it():
    cfg = DecoderConfig(vocab_size=11, d_model=D, num_heads=2, num_layers=1, mixer_pattern="softmax")
    model = tk.build_module(DecoderLM, cfg)
    tokens = jnp.asarray((np.arange(B * T).reshape(B, T) * 3) % 11)

    def loss(m, batch=tokens):
        logits = m(batch)[0]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), batch[:, 1:, None], -1))

    imp = heads.head_importance(model, loss, [tokens], **FAST)
    # central differences of the loss in ξ_h, every evaluation the same compiled program (masks are inputs)
    eps = 1e-2
    layers = sorted(imp)
    with heads.head_masks(model):
        g, _, rest = nnx.split(model, HeadMask, ...)
        run = tk.fast_jit(lambda mm, r: loss(nnx.merge(g, mm, r)))
        base = float(run(nnx.split(model, HeadMask, ...)[1], rest))
        for path in layers:
            for h in range(2):
                vals = []
                for sign in (1, -1):
                    v = np.ones(2, np.float32)
                    v[h] += sign * eps
                    heads.set_head_mask(model, {path: v})
                    vals.append(float(run(nnx.split(model, HeadMask, ...)[1], rest)))
                heads.set_head_mask(model, {path: np.ones(2)})
                np.testing.assert_allclose(imp[path][h], abs(vals[0] - vals[1]) / (2 * eps), rtol=2e-2, atol=1e-5)
    order = metrics.prune_order(metrics.normalize_importance(imp))
    curve = heads.pruning_curve(model, loss, order, counts=[0, 2], **FAST)
    assert curve[0][0] == 0 and abs(curve[0][1] - base) < 1e-5
    # every head masked: attention contributes nothing, the logits depend on each token alone
    assert curve[1][1] != curve[0][1]


def test_attention_gradients_equal_the_hand_derived_gradient():
    m = tk.build_module(mixers.get("softmax"), D, H, positional="none")
    x = _x(1)
    c = jax.random.normal(jax.random.key(2), (B, T, D))
    maps, grads = heads.attention_gradients(m, lambda out: jnp.sum(out[0] * c), x, **FAST)
    v = np.einsum("bsd,dkf->bskf", np.asarray(x, np.float64), np.asarray(m.w_v[...], np.float64))
    cw = np.einsum("btd,hfd->bthf", np.asarray(c, np.float64), np.asarray(m.w_o[...], np.float64))
    expect = np.einsum("bthf,bshf->bhts", cw, v)             # f = Σ c·(Σ_s A_ts v_s) W_o
    tk.assert_close(grads[""], expect, dtype=jnp.float32, rel=1e-4, atol=1e-4, name="dA")
    assert maps[""].shape == (B, H, T, T)
    np.testing.assert_allclose(maps[""].sum(-1), 1.0, rtol=1e-5)

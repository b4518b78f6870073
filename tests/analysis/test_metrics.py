"""attn_jax.analysis.metrics on hand-built attention maps with known answers (NumPy only: no compiles)."""

import numpy as np
import pytest

from attn_jax.analysis import metrics as M


def _causal_uniform(B, H, T):
    a = np.tril(np.ones((T, T)))
    return np.broadcast_to(a / a.sum(-1, keepdims=True), (B, H, T, T)).copy()


def _one_hot_first(B, H, T):
    a = np.zeros((B, H, T, T))
    a[..., 0] = 1.0
    return a


def test_entropy_of_uniform_is_log_s_and_of_one_hot_is_zero():
    S = 7
    np.testing.assert_allclose(M.attention_entropy(np.full((2, 3, 5, S), 1 / S)), np.log(S), rtol=1e-12)
    np.testing.assert_allclose(M.attention_entropy(_one_hot_first(1, 2, 4)), 0.0, atol=0)
    # causal uniform: row i spreads over i + 1 keys; a padded (all-zero) query row is left out
    a = _causal_uniform(2, 3, 6)
    a[1, :, 5] = 0.0
    mask = np.ones((2, 6), bool)
    mask[1, 5] = False
    expect = np.log(np.arange(1, 7))
    np.testing.assert_allclose(M.head_entropy(a), (expect.sum() * 2 - expect[5]) / 11, rtol=1e-12)
    np.testing.assert_allclose(M.head_entropy(a, query_mask=mask), M.head_entropy(a), rtol=1e-12)
    with pytest.raises(ValueError, match="weights"):
        M.attention_entropy(-np.ones((2, 2)))


def test_sink_ratio_of_one_hot_first_is_one_and_counts_heads():
    assert M.sink_ratio(_one_hot_first(2, 4, 8)) == 1.0
    a = _one_hot_first(2, 4, 8)
    a[:, 2:] = np.eye(8)                                  # heads 2, 3 attend to themselves
    assert M.sink_ratio([a, _one_hot_first(2, 4, 8)]) == pytest.approx(0.75)   # 2/4 and 4/4 heads
    np.testing.assert_allclose(M.sink_scores(a)[0], [1, 1, 1 / 8, 1 / 8])
    # uniform causal: α_0 = mean_i 1/(i+1) = H_T / T; with T = 8 that is 0.340 > 0.3, T = 12 0.259 < 0.3
    np.testing.assert_allclose(M.sink_scores(_causal_uniform(1, 1, 8)), np.sum(1 / np.arange(1, 9)) / 8)
    assert M.sink_ratio(_causal_uniform(1, 2, 8)) == 1.0 and M.sink_ratio(_causal_uniform(1, 2, 12)) == 0.0
    with pytest.raises(ValueError, match="key"):
        M.sink_scores(a, key=8)


def test_massive_activations_found_by_magnitude_and_ratio():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(2, 6, 32))
    h[1, 0, 7] = -4000.0
    h[0, 3, 7] = 2500.0
    st = M.massive_activations(h, top_k=2)
    assert st["count"] == 2 and st["channels"] == [7]
    assert st["positions"] == [(6, 7), (3, 7)]            # batch folded into the token index: 1 * 6 + 0
    np.testing.assert_allclose(st["top"], [4000.0, 2500.0])
    assert st["ratio"] == pytest.approx(4000.0 / st["median"])
    h[1, 0, 7], h[0, 3, 7] = 90.0, 50.0                   # large but under the absolute threshold
    assert M.massive_activations(h)["count"] == 0


def test_retrieval_score_counts_copied_needle_tokens_per_head():
    B, H, T, S = 1, 3, 3, 8
    keys = np.array([[1, 2, 7, 8, 9, 3, 4, 5]])
    needle = np.zeros((B, S), bool)
    needle[0, 2:5] = True
    outs = np.array([[7, 8, 9]])
    a = np.zeros((B, H, T, S))
    a[0, 0, [0, 1, 2], [2, 3, 4]] = 1.0                   # head 0 copies all three
    a[0, 1, :, 0] = 1.0                                   # head 1 looks at the first token
    a[0, 2, [0, 1, 2], [2, 3, 0]] = 1.0                   # head 2 copies two
    np.testing.assert_allclose(M.retrieval_score(a, keys, outs, needle), [1.0, 0.0, 2 / 3])
    # a step whose output is not a needle token never counts
    np.testing.assert_allclose(M.retrieval_score(a, keys, np.array([[7, 8, 1]]), needle), [2 / 3, 0.0, 2 / 3])
    with pytest.raises(ValueError, match="needle"):
        M.retrieval_score(a, keys, outs, needle[:, :4])


def test_lookback_ratio_on_a_hand_map():
    a = np.zeros((5, 5))
    a[2, :3] = [0.2, 0.2, 0.6]
    a[3, :4] = [0.1, 0.3, 0.2, 0.4]
    a[4, :5] = [0.1, 0.1, 0.2, 0.2, 0.4]
    ctx = np.array([0.2, 0.2, 0.1])
    new = np.array([0.0, 0.2, 0.2])
    np.testing.assert_allclose(M.lookback_ratio(a, 2), ctx / (ctx + new))
    assert M.lookback_ratio(a, 2)[0] == 1.0


def test_rollout_of_identity_maps_is_identity_and_of_plain_maps_their_product():
    eye = np.broadcast_to(np.eye(5), (2, 3, 5, 5))
    np.testing.assert_allclose(M.attention_rollout([eye, eye, eye]), np.broadcast_to(np.eye(5), (2, 5, 5)))
    a1, a2 = _causal_uniform(2, 3, 5), _one_hot_first(2, 3, 5)
    np.testing.assert_allclose(M.attention_rollout([a1, a2], residual=0.0), a2[:, 0] @ a1[:, 0])
    half = 0.5 * a1[:, 0] + 0.5 * np.eye(5)
    np.testing.assert_allclose(M.attention_rollout([a1, a1]), half @ half)
    np.testing.assert_allclose(M.attention_rollout([a1, a2]).sum(-1), 1.0)


def test_max_flow_and_attention_flow_of_a_chain():
    # the CLRS flow network (maximum flow 23)
    c = np.zeros((6, 6))
    for u, v, w in [(0, 1, 16), (0, 2, 13), (1, 3, 12), (2, 1, 4), (2, 4, 14), (3, 2, 9), (3, 5, 20), (4, 3, 7),
                    (4, 5, 4)]:
        c[u, v] = w
    assert M.max_flow(c, 0, 5) == pytest.approx(23.0)
    # chain: output token 1 -> token 0 (layer 2, capacity 1) -> token 0 (layer 1): flow 1 to input 0 only
    a1 = np.array([[[[1.0, 0.0], [1.0, 0.0]]]])
    a2 = np.array([[[[1.0, 0.0], [0.0, 1.0]]]])
    np.testing.assert_allclose(M.attention_flow([a1, a2], residual=0.0), [[1.0, 0.0], [1.0, 0.0]])
    # one layer: the flow is the single edge's capacity, Ã itself
    a = _causal_uniform(1, 2, 4)
    np.testing.assert_allclose(M.attention_flow([a]), M.residual_maps([a])[0, 0], atol=1e-12)
    # a bottleneck: two layers whose paths to input 0 pass one edge of capacity 0.25
    b1 = np.array([[[[1.0, 0.0], [0.25, 0.75]]]])
    b2 = np.array([[[[1.0, 0.0], [0.0, 1.0]]]])
    np.testing.assert_allclose(M.attention_flow([b1, b2], residual=0.0)[1], [0.25, 0.75])


def test_gradient_weighted_rollout_known_cases():
    a = _one_hot_first(2, 3, 4)
    np.testing.assert_allclose(M.gradient_weighted_rollout([a], [np.zeros_like(a)]), np.broadcast_to(np.eye(4),
                                                                                                      (2, 4, 4)))
    r = M.gradient_weighted_rollout([a, a], [np.ones_like(a), -np.ones_like(a)])   # the negative layer drops out
    np.testing.assert_allclose(r, np.eye(4) + a[:, 0])
    r2 = M.gradient_weighted_rollout([a, a], [np.ones_like(a), np.ones_like(a)])
    np.testing.assert_allclose(r2, (np.eye(4) + a[:, 0]) @ (np.eye(4) + a[:, 0]))
    with pytest.raises(ValueError, match="grads"):
        M.gradient_weighted_rollout([a], [a[..., :3]])


def test_importance_normalisation_and_prune_order():
    s = {"l0": np.array([3.0, 4.0]), "l1": np.array([1.0, 0.0])}
    n = M.normalize_importance(s)
    np.testing.assert_allclose(n["l0"], [0.6, 0.8])
    np.testing.assert_allclose(n["l1"], [1.0, 0.0])
    assert M.prune_order(n) == [("l1", 1), ("l0", 0), ("l0", 1), ("l1", 0)]

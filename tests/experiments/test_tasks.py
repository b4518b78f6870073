"""Tests of the experiment tasks (numpy only): determinism, layout, labels recomputed
independently, statistics, provenance, and argument validation."""

from __future__ import annotations

import hashlib
import random
import statistics

import numpy as np
import pytest

import experiments.tasks as tasks
from experiments.tasks import bytes_lm, counting, digits, flip_flop, icl_regression, listops, mqar

# Small configurations used by the generic tests (one per registered task).
SMALL = {
    "mqar": dict(vocab_size=256, seq_len=64, num_kv_pairs=4),
    "selective_copy": dict(vocab_size=10, seq_len=48, num_tokens_to_copy=6),
    "induction_heads": dict(vocab_size=16, seq_len=32),
    "icl_regression": dict(dim=3, num_points=8),
    "listops": dict(seq_len=64, min_length=8, max_depth=5, max_args=5),
    "flip_flop": dict(seq_len=64),
    "counting": dict(seq_len=32, num_symbols=4, num_vars=2),
    "bytes_lm": dict(seq_len=32),
    "digits": dict(),
}


def test_every_task_has_a_small_config():
    # Other test files register throwaway tasks in the same process; count only this package's.
    from experiments.tasks import base
    own = sorted(n for n, f in base._REGISTRY.items() if f.__module__.startswith("experiments.tasks."))
    assert sorted(SMALL) == own


@pytest.mark.parametrize("name", sorted(SMALL))
def test_layout_and_determinism(name):
    t = tasks.make(name, **SMALL[name])
    assert isinstance(t, tasks.Task)
    assert t.name == name and t.seed == 0
    B = 5
    b = t.batch("train", 3, B)
    if t.kind == "lm":
        T = t.seq_len
        assert b["inputs"].shape == b["targets"].shape == b["weights"].shape == (B, T)
        assert b["inputs"].dtype == b["targets"].dtype == np.int32
        assert b["inputs"].min() >= 0 and b["inputs"].max() < t.vocab_size
        assert b["targets"].min() >= 0 and b["targets"].max() < t.vocab_size
    elif t.kind == "regress":
        T = t.seq_len
        assert b["inputs"].shape == (B, T, t.input_dim) and b["inputs"].dtype == np.float32
        assert b["targets"].shape == (B, T, t.output_dim) and b["targets"].dtype == np.float32
        assert b["weights"].shape == (B, T)
    else:
        assert t.kind == "image" and t.seq_len == 0
        assert b["inputs"].shape == (B, *t.image_shape) and b["inputs"].dtype == np.float32
        assert b["targets"].shape == (B,) and b["targets"].dtype == np.int32
        assert b["targets"].min() >= 0 and b["targets"].max() < t.num_classes
        assert b["weights"].shape == (B,)
    assert b["weights"].dtype == np.float32 and b["weights"].sum() > 0
    assert set(np.unique(b["weights"])) <= {0.0, 1.0}

    def same(x, y):
        return all(np.array_equal(x[k], y[k]) for k in ("inputs", "targets", "weights"))

    assert same(b, t.batch("train", 3, B))
    assert same(b, tasks.make(name, **SMALL[name]).batch("train", 3, B))
    assert not same(b, t.batch("train", 4, B))
    assert not same(b, t.batch("valid", 3, B))
    assert not same(b, tasks.make(name, **SMALL[name], seed=1).batch("train", 3, B))
    if name != "digits":      # digits' validation batches are fixed slices, independent of seed
        v = t.batch("valid", 3, B)
        assert same(v, t.batch("valid", 3, B))
        assert not same(v, tasks.make(name, **SMALL[name], seed=1).batch("valid", 3, B))
    with pytest.raises(ValueError, match="split"):
        t.batch("test", 0, B)
    with pytest.raises(ValueError, match="index"):
        t.batch("train", -1, B)


def test_make_unknown_name_lists_names_and_closest_match():
    with pytest.raises(ValueError) as e:
        tasks.make("mqr")
    msg = str(e.value)
    assert "'mqar'" in msg and "registered tasks" in msg
    for n in tasks.names():
        assert n in msg
    with pytest.raises(TypeError):
        tasks.make("mqar", not_a_field=1)


@pytest.mark.parametrize("name, kwargs, field", [
    ("mqar", dict(seq_len=63), "seq_len"),
    ("mqar", dict(vocab_size=64, seq_len=64), "vocab_size"),
    ("mqar", dict(num_kv_pairs=17), "num_kv_pairs"),
    ("mqar", dict(power_a=0.0), "power_a"),
    ("selective_copy", dict(seq_len=10, num_tokens_to_copy=6), "seq_len"),
    ("selective_copy", dict(vocab_size=2), "vocab_size"),
    ("selective_copy", dict(num_tokens_to_copy=0), "num_tokens_to_copy"),
    ("induction_heads", dict(vocab_size=2), "vocab_size"),
    ("induction_heads", dict(seq_len=2), "seq_len"),
    ("icl_regression", dict(dim=0), "dim"),
    ("icl_regression", dict(num_points=0), "num_points"),
    ("icl_regression", dict(noise_std=-1.0), "noise_std"),
    ("listops", dict(max_depth=1), "max_depth"),
    ("listops", dict(max_args=1), "max_args"),
    ("listops", dict(seq_len=64, max_length=65), "max_length"),
    ("listops", dict(seq_len=64, min_length=63), "min_length"),
    ("flip_flop", dict(seq_len=63), "seq_len"),
    ("flip_flop", dict(p_write=1.5), "p_write"),
    ("flip_flop", dict(p_ignore=0.5), "p_read"),
    ("counting", dict(num_vars=9, num_symbols=8), "num_vars"),
    ("counting", dict(num_symbols=1), "num_symbols"),
    ("counting", dict(seq_len=2), "seq_len"),
    ("bytes_lm", dict(valid_fraction=1.0), "valid_fraction"),
    ("bytes_lm", dict(seq_len=0), "seq_len"),
    ("bytes_lm", dict(max_bytes=100, seq_len=32), "max_bytes"),
    ("digits", dict(valid_fraction=0.0), "valid_fraction"),
])
def test_constructor_validation_names_the_field(name, kwargs, field):
    with pytest.raises(ValueError) as e:
        tasks.make(name, **kwargs)
    assert str(e.value).startswith(field + ":"), str(e.value)


# ----------------------------------------------------------------------------------- MQAR


def test_mqar_labels_and_structure():
    t = mqar.MQAR(vocab_size=512, seq_len=128, num_kv_pairs=8)
    b = t.batch("train", 0, 64)
    V, N, C = t.vocab_size, t.num_kv_pairs, 2 * t.num_kv_pairs
    for x, y, w in zip(b["inputs"], b["targets"], b["weights"]):
        keys, vals = x[0:C:2], x[1:C:2]
        assert np.all((1 <= keys) & (keys < V // 2)) and np.all((V // 2 <= vals) & (vals < V))
        assert len(set(keys.tolist())) == N and len(set(vals.tolist())) == N
        binding = dict(zip(keys.tolist(), vals.tolist()))
        qpos = np.flatnonzero(w)
        assert qpos.size == N and np.all(qpos >= C) and np.all((qpos - C) % 2 == 0)
        assert sorted(x[qpos].tolist()) == sorted(keys.tolist())          # each key queried once
        for p in qpos:
            assert y[p] == binding[int(x[p])]
        assert np.all(y[w == 0] == 0)


def test_mqar_without_random_non_queries_fills_zeros():
    t = mqar.MQAR(vocab_size=256, seq_len=64, num_kv_pairs=4, random_non_queries=False)
    b = t.batch("valid", 1, 16)
    C = 8
    after = b["inputs"][:, C:]
    query = b["weights"][:, C:] > 0
    assert np.all(after[~query] == 0) and np.all(after[query] > 0)
    t2 = mqar.MQAR(vocab_size=256, seq_len=64, num_kv_pairs=4)
    filler = t2.batch("valid", 1, 64)
    f = filler["inputs"][:, C:][filler["weights"][:, C:] == 0]
    assert len(np.unique(f)) > 100                # uniform over the whole vocabulary


def test_mqar_gap_distribution_matches_zoology_successive_sampling():
    t = mqar.MQAR(vocab_size=256, seq_len=64, num_kv_pairs=4, power_a=0.01)
    S, N, C = t.num_gap_slots, 4, 8
    ours = np.zeros(S)
    rows = 0
    for i in range(8):
        w = t.batch("train", i, 500)["weights"]
        gaps = (np.nonzero(w)[1] - C) // 2
        ours += np.bincount(gaps, minlength=S)
        rows += w.shape[0]
    ours /= rows
    # Zoology's own sampler: np.random.choice(space, N, replace=False, p=power-law).
    p = mqar.power_law_probs(S, 0.01)
    rs = np.random.RandomState(0)
    ref = np.zeros(S)
    for _ in range(3000):
        ref[rs.choice(S, size=N, replace=False, p=p)] += 1
    ref /= 3000
    assert np.allclose(ours.sum(), N) and np.allclose(ref.sum(), N)
    assert np.max(np.abs(ours - ref)) < 0.06
    assert ours[:S // 4].sum() > 2 * ours[-(S // 4):].sum()               # short gaps dominate
    assert ours[0] > ours[S // 2] > 0


# --------------------------------------------------------------------------- selective copy


def test_selective_copy_order_and_layout():
    t = tasks.make("selective_copy", vocab_size=10, seq_len=64, num_tokens_to_copy=8)
    b = t.batch("train", 0, 32)
    M, T = 8, 64
    for x, y, w in zip(b["inputs"], b["targets"], b["weights"]):
        region = x[: T - M]
        data = region[region != 0]
        assert data.size == M and np.all((1 <= data) & (data <= 8))
        assert np.all(x[T - M:] == 9)
        assert np.array_equal(y[T - M:], data)
        assert np.array_equal(np.flatnonzero(w), np.arange(T - M, T))


def test_selective_copy_positions_spread_over_region():
    t = tasks.make("selective_copy", vocab_size=10, seq_len=64, num_tokens_to_copy=8)
    x = t.batch("train", 1, 400)["inputs"][:, :56]
    freq = (x != 0).mean(axis=0)
    assert np.all(np.abs(freq - 8 / 56) < 0.08)


# --------------------------------------------------------------------------- induction heads


def test_induction_heads_answer():
    t = tasks.make("induction_heads", vocab_size=8, seq_len=40)
    b = t.batch("valid", 2, 64)
    trig = 7
    for x, y, w in zip(b["inputs"], b["targets"], b["weights"]):
        where = np.flatnonzero(x == trig)
        assert where.size == 2 and where[1] == 39 and where[0] <= 37
        assert y[39] == x[where[0] + 1] != trig
        assert np.array_equal(np.flatnonzero(w), [39])


# --------------------------------------------------------------------------- ICL regression


def test_icl_regression_layout_and_least_squares_recovers_w():
    t = icl_regression.ICLRegression(dim=5, num_points=20)
    B = 16
    w, x, y = t.sample("train", 0, B)
    b = t.batch("train", 0, B)
    inp = b["inputs"]
    assert np.allclose(inp[:, 0::2, :5], x, atol=1e-6) and np.all(inp[:, 0::2, 5] == 0)
    assert np.all(inp[:, 1::2, :5] == 0) and np.allclose(inp[:, 1::2, 5], y, atol=1e-5)
    assert np.allclose(b["targets"][:, 0::2, 0], y, atol=1e-5) and np.all(b["targets"][:, 1::2] == 0)
    assert np.array_equal(b["weights"], np.tile([1.0, 0.0], 20)[None].repeat(B, 0))
    xs, ys = icl_regression.split_batch(b)
    for i in range(B):
        w_hat = np.linalg.lstsq(xs[i], ys[i], rcond=None)[0]
        assert np.allclose(w_hat, w[i], atol=1e-4)


def test_icl_regression_ridge_baseline_matches_theory():
    t = icl_regression.ICLRegression(dim=5, num_points=12)
    b = t.batch("valid", 0, 4000)
    mse = icl_regression.ridge_baseline(b, lam=0.0)
    assert mse.shape == (12,)
    # noiseless min-norm least squares: E[err_i] = d - i for i < d, 0 from i = d on
    for i in range(5):
        assert abs(mse[i] - (5 - i)) < 0.35, (i, mse[i])
    assert np.all(mse[5:] < 1e-6)
    noisy = icl_regression.ICLRegression(dim=5, num_points=12, noise_std=0.5)
    nb = noisy.batch("valid", 0, 2000)
    ridge = icl_regression.ridge_baseline(nb, lam=0.25)
    ls = icl_regression.ridge_baseline(nb, lam=0.0)
    assert ridge[-1] < 0.25 * 2 and ridge[-1] > 0.2          # ~ noise variance at n=11
    assert ridge[6] < ls[6]                                   # Bayes-optimal beats least squares near n ~ d
    with pytest.raises(ValueError, match="lam"):
        icl_regression.ridge_baseline(nb, lam=-1.0)


# --------------------------------------------------------------------------- ListOps


def test_listops_evaluator_semantics():
    L = listops
    D = L.DIGIT0
    assert L.evaluate([L.MED, D + 1, D + 2, L.CLOSE]) == 1          # int(median(1, 2)) = 1
    assert L.evaluate([L.MED, D + 3, D + 9, D + 1, L.CLOSE]) == 3
    assert L.evaluate([L.SM, D + 9, D + 9, L.CLOSE, L.QUERY]) == 8
    assert L.evaluate([L.MAX, D + 2, L.MIN, D + 7, D + 4, L.CLOSE, L.CLOSE]) == 4
    assert L.detokenize([L.MAX, D + 2, D + 5, L.CLOSE, L.QUERY, L.PAD]) == "[MAX 2 5 ] ?"


def test_listops_labels_lengths_and_depth():
    t = listops.ListOps(seq_len=128, min_length=16, max_depth=6, max_args=6)
    labels = []
    for i in range(4):
        b = t.batch("train", i, 64)
        for x, y, w in zip(b["inputs"], b["targets"], b["weights"]):
            n = int(np.flatnonzero(x == listops.QUERY)[0])
            assert 16 < n < 128
            assert np.all(x[n + 1:] == listops.PAD) and np.all(x[:n] != listops.PAD)
            assert np.array_equal(np.flatnonzero(w), [n])
            value = listops.evaluate(x[: n + 1])
            assert y[n] == listops.DIGIT0 + value
            labels.append(value)
            depth = np.cumsum(np.isin(x[:n], [1, 2, 3, 4]).astype(int) - (x[:n] == listops.CLOSE))
            assert depth.max() <= 6 - 1 and depth[-1] == 0
    assert set(labels) == set(range(10))


def _lra_reference_tree(rnd, depth, max_depth, max_args):
    """LRA's recursive generator (VALUE_P = 0.25), returning the token count."""
    if depth < max_depth and rnd.random() <= 0.25:
        k = rnd.randint(2, max_args)
        return 2 + sum(_lra_reference_tree(rnd, depth + 1, max_depth, max_args) for _ in range(k))
    return 1


def test_listops_length_distribution_matches_lra_recursion():
    rnd = random.Random(0)
    ref = []
    while len(ref) < 3000:
        n = _lra_reference_tree(rnd, 1, 4, 4)
        if 4 < n < 40:
            ref.append(n)
    t = listops.ListOps(seq_len=40, min_length=4, max_depth=4, max_args=4)
    ours = []
    for i in range(12):
        b = t.batch("train", i, 250)
        ours.extend(np.argmax(b["inputs"] == listops.QUERY, axis=1).tolist())   # = token count
    m_ref, m_ours = statistics.mean(ref), statistics.mean(ours)
    se = (statistics.pstdev(ref) ** 2 / len(ref) + statistics.pstdev(ours) ** 2 / len(ours)) ** 0.5
    assert abs(m_ref - m_ours) < 5 * se, (m_ref, m_ours, se)


# --------------------------------------------------------------------------- Flip-Flop


def test_flip_flop_reads_return_last_write():
    t = flip_flop.FlipFlop(seq_len=128)
    b = t.batch("train", 0, 32)
    for x, y, w in zip(b["inputs"], b["targets"], b["weights"]):
        assert x[0] == flip_flop.W and x[-2] == flip_flop.R
        assert np.all(np.isin(x[0::2], [0, 1, 2])) and np.all(np.isin(x[1::2], [3, 4]))
        assert np.array_equal(y[:-1], x[1:]) and y[-1] == 0
        register = None
        for k in range(0, 128, 2):
            if x[k] == flip_flop.W:
                register = x[k + 1]
            elif x[k] == flip_flop.R:
                assert x[k + 1] == register
        assert np.array_equal(np.flatnonzero(w), np.flatnonzero(x == flip_flop.R))


@pytest.mark.parametrize("p_ignore", [0.8, 0.98, 0.1])
def test_flip_flop_instruction_frequencies(p_ignore):
    t = flip_flop.FlipFlop.ffl(p_ignore, seq_len=512)
    instr = t.batch("train", 5, 128)["inputs"][:, 2:-2:2]        # exclude the forced first/last
    freq = np.bincount(instr.ravel(), minlength=3) / instr.size
    rest = (1 - p_ignore) / 2
    assert np.allclose(freq, [rest, p_ignore, rest], atol=0.01), freq
    bits = t.batch("train", 5, 128)["inputs"][:, 1::2]
    ignored = bits[t.batch("train", 5, 128)["inputs"][:, 0::2] == flip_flop.I]
    assert abs((ignored == flip_flop.BIT1).mean() - 0.5) < 0.02


# --------------------------------------------------------------------------- counting


def test_counting_labels():
    t = counting.Counting(seq_len=40, num_symbols=5, num_vars=3)
    b = t.batch("train", 0, 64)
    L = 38
    seen_vars = set()
    for x, y, w in zip(b["inputs"], b["targets"], b["weights"]):
        assert x[L] == t.query_token and 0 <= x[L + 1] < 3
        assert np.all(x[:L] < 5)
        v = int(x[L + 1])
        seen_vars.add(v)
        assert y[39] == t.count_offset + sum(1 for c in x[:L] if c == v)
        assert np.array_equal(np.flatnonzero(w), [39])
    assert seen_vars == {0, 1, 2}
    assert t.vocab_size == 5 + 1 + 39


# --------------------------------------------------------------------------- bytes LM


def test_bytes_lm_provenance():
    info = bytes_lm.corpus_info()
    assert info["num_files"] > 100 and info["total_bytes"] > 1_000_000
    assert info["train_bytes"] + info["valid_bytes"] == info["total_bytes"]
    assert info["valid_bytes"] == int(info["total_bytes"] * 0.05)
    data = bytes_lm.load_corpus()
    assert info["sha256"] == hashlib.sha256(data.tobytes()).hexdigest()
    files = bytes_lm.corpus_files()
    assert list(files) == sorted(files) and len(files) == info["num_files"]
    assert not any(set(f.split("/")[:-1]) & bytes_lm.EXCLUDED_DIRS for f in files)
    assert all(f.endswith(".py") for f in files)
    assert int((data == bytes_lm.SEPARATOR).sum()) == len(files) - 1
    t = bytes_lm.BytesLM()
    assert t.info() == info and t.vocab_size == 256


def test_bytes_lm_windows_are_shifted_and_inside_their_split():
    t = bytes_lm.BytesLM(seq_len=24, max_bytes=50_000)
    data = bytes_lm.load_corpus(50_000).tobytes()
    n_train, n_valid = t.split_sizes
    assert n_valid == 2500 and n_train == 47_500
    assert t.split_bounds("train") == (0, n_train) and t.split_bounds("valid") == (n_train, 50_000)
    train_bytes, valid_bytes = data[:n_train], data[n_train:]
    for split, region in (("train", train_bytes), ("valid", valid_bytes)):
        b = t.batch(split, 0, 64)
        assert np.array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
        assert np.all(b["weights"] == 1)
        for x, y in zip(b["inputs"], b["targets"]):
            window = bytes(x.astype(np.uint8)) + bytes([int(y[-1])])
            assert window in region
    assert bytes_lm.corpus_info(max_bytes=50_000)["total_bytes"] == 50_000


# --------------------------------------------------------------------------- digits


def test_digits_split_and_valid_epoch_coverage():
    t = digits.Digits()
    assert t.num_train + t.num_valid == 1797 and t.num_valid == 359
    train_idx, valid_idx = digits.load_split(0.2)
    assert not set(train_idx.tolist()) & set(valid_idx.tolist())
    images, labels = digits._load()
    assert images.shape == (1797, 8, 8, 1) and images.min() == 0.0 and images.max() == 1.0
    counts = np.bincount(labels[valid_idx], minlength=10)
    assert np.array_equal(counts, np.round(np.bincount(labels, minlength=10) * 0.2).astype(int))
    for B in (64, 100, 359, 360, 500):
        nb = t.valid_batches_per_epoch(B)
        assert nb == -(-359 // B)
        got = []
        for i in range(nb):
            b = t.batch("valid", i, B)
            keep = b["weights"] > 0
            got.extend(zip(b["targets"][keep].tolist(), [im.tobytes() for im in b["inputs"][keep]]))
        want = list(zip(labels[valid_idx].tolist(), [im.tobytes() for im in images[valid_idx]]))
        assert sorted(got) == sorted(want)                       # each validation image exactly once
        assert np.array_equal(t.batch("valid", nb, B)["targets"], t.batch("valid", 0, B)["targets"])
    train_set = {im.tobytes() for im in images[train_idx]}
    b = t.batch("train", 7, 256)
    assert all(im.tobytes() in train_set for im in b["inputs"])

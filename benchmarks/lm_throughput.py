"""Language-model throughput on CPU: attn_jax DecoderLM vs a plain Flax NNX baseline.

    python -m benchmarks.lm_throughput [--quick] [--steps 5] [--out results/bench/lm_throughput.json]

Training: a jitted train step (forward + backward + optax AdamW update) of a 4-layer
``d_model=256`` decoder LM (4 heads, vocab 256, RoPE, SwiGLU, RMSNorm, tied embeddings) at
``T = 512`` and ``T = 2048`` with 8192 tokens per step, timed against a baseline of
identical shapes written here on ``jax.nn.dot_product_attention(is_causal=True)``.  Both
models are timed in the same process, alternately; we report the median of ``--steps``
timed steps after a warm-up step (compilation excluded).

Generation: ``attn_jax.models.generate`` (jit-compiled prefill + ``while_loop`` decode over
KV caches), greedy, prompt 64 tokens, 128 new tokens, batch 1 and 8; median of
``--gen-repeats`` calls after a warm-up call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import optax
from flax import nnx

import attn_jax as aj
from attn_jax import masks
from attn_jax.models import DecoderConfig, DecoderLM, generate
from attn_jax.positional import apply_rope

try:  # shared helpers, when present
    from benchmarks.common import environment as _environment
except Exception:  # pragma: no cover - benchmarks.common is optional
    _environment = None

VOCAB, D_MODEL, LAYERS, HEADS = 256, 256, 4, 4


# ----------------------------------------------------------------------------- baseline


class _BaselineBlock(nnx.Module):
    def __init__(self, d, heads, hidden, rngs):
        init = nnx.initializers.lecun_normal()
        self.heads = heads
        self.n1 = nnx.RMSNorm(d, epsilon=1e-6, rngs=rngs)
        self.n2 = nnx.RMSNorm(d, epsilon=1e-6, rngs=rngs)
        self.wq = nnx.Linear(d, d, use_bias=False, kernel_init=init, rngs=rngs)
        self.wk = nnx.Linear(d, d, use_bias=False, kernel_init=init, rngs=rngs)
        self.wv = nnx.Linear(d, d, use_bias=False, kernel_init=init, rngs=rngs)
        self.wo = nnx.Linear(d, d, use_bias=False, kernel_init=init, rngs=rngs)
        self.w_gate = nnx.Linear(d, hidden, use_bias=False, kernel_init=init, rngs=rngs)
        self.w_up = nnx.Linear(d, hidden, use_bias=False, kernel_init=init, rngs=rngs)
        self.w_down = nnx.Linear(hidden, d, use_bias=False, kernel_init=init, rngs=rngs)

    def __call__(self, x):
        B, T, d = x.shape
        h = self.n1(x)
        split = lambda y: y.reshape(B, T, self.heads, d // self.heads)  # noqa: E731
        q, k, v = split(self.wq(h)), split(self.wk(h)), split(self.wv(h))
        q, k = apply_rope(q), apply_rope(k)
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        x = x + self.wo(o.reshape(B, T, d))
        h = self.n2(x)
        return x + self.w_down(jax.nn.silu(self.w_gate(h)) * self.w_up(h))


class BaselineLM(nnx.Module):
    """The same architecture written directly on ``jax.nn.dot_product_attention``."""

    def __init__(self, vocab, d, layers, heads, hidden, rngs):
        self.embed = nnx.Embed(vocab, d, embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.blocks = nnx.List([_BaselineBlock(d, heads, hidden, rngs) for _ in range(layers)])
        self.norm = nnx.RMSNorm(d, epsilon=1e-6, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for b in self.blocks:
            x = b(x)
        return self.embed.attend(self.norm(x)), None


# ----------------------------------------------------------------------------- timing


def _train_step_fn(graphdef, tx):
    @jax.jit
    def step(params, rest, opt_state, tokens):
        def loss_fn(params):
            logits, _ = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def _setup_train(model, tokens):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    step = _train_step_fn(graphdef, tx)
    return step, [params, rest, opt_state], tokens


def _run_step(setup):
    step, st, tokens = setup
    params, opt_state, loss = step(st[0], st[1], st[2], tokens)
    jax.block_until_ready((params, opt_state, loss))
    st[0], st[2] = params, opt_state
    return float(loss)


def bench_training(seq_len: int, tokens_per_step: int, steps: int) -> dict:
    batch = max(1, tokens_per_step // seq_len)
    # T + 1 tokens per row so that inputs have exactly T positions.
    tokens = jax.random.randint(jax.random.key(0), (batch, seq_len + 1), 0, VOCAB)
    cfg = DecoderConfig(vocab_size=VOCAB, d_model=D_MODEL, num_layers=LAYERS, num_heads=HEADS)
    ours = _setup_train(DecoderLM(cfg, rngs=nnx.Rngs(0)), tokens)
    base = _setup_train(BaselineLM(VOCAB, D_MODEL, LAYERS, HEADS, cfg.hidden, nnx.Rngs(0)), tokens)
    compile_s = {}
    for name, s in (("attn_jax", ours), ("baseline", base)):
        t0 = time.perf_counter()
        _run_step(s)                                   # compile + first step
        compile_s[name] = time.perf_counter() - t0
    times = {"attn_jax": [], "baseline": []}
    losses = {}
    for _ in range(steps):                             # alternate so load drift hits both alike
        for name, s in (("attn_jax", ours), ("baseline", base)):
            t0 = time.perf_counter()
            losses[name] = _run_step(s)
            times[name].append(time.perf_counter() - t0)
    out = {"seq_len": seq_len, "batch": batch, "tokens_per_step": batch * seq_len, "timed_steps": steps,
           "attention_auto_cpu": _auto_choice(batch, seq_len)}
    for name in times:
        med = statistics.median(times[name])
        out[name] = {"median_step_s": med, "tokens_per_s": batch * seq_len / med, "step_times_s": times[name],
                     "compile_and_first_step_s": compile_s[name], "last_loss": losses[name]}
    out["speedup_vs_baseline"] = out["baseline"]["median_step_s"] / out["attn_jax"]["median_step_s"]
    return out


def _auto_choice(batch: int, seq_len: int) -> str | None:
    """The implementation ``aj.attention(impl="auto")`` picks on CPU for one layer's attention."""
    qs = jax.ShapeDtypeStruct((batch, seq_len, HEADS, D_MODEL // HEADS), jax.numpy.float32)
    return aj.explain(qs, qs, qs, mask=masks.causal(), platform="cpu").chosen["cpu"]


def bench_generation(batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    cfg = DecoderConfig(vocab_size=VOCAB, d_model=D_MODEL, num_layers=LAYERS, num_heads=HEADS)
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    prompts = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, VOCAB)
    run = lambda: jax.block_until_ready(generate(model, prompts, max_new_tokens=new_tokens).tokens)  # noqa: E731
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "median_s": med,
            "tokens_per_s": batch * new_tokens / med, "times_s": times, "compile_and_first_call_s": first}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="timed train steps per model (>= 5)")
    ap.add_argument("--tokens-per-step", type=int, default=8192)
    ap.add_argument("--seq-lens", default="512,2048")
    ap.add_argument("--gen-repeats", type=int, default=5)
    ap.add_argument("--gen-batches", default="1,8")
    ap.add_argument("--quick", action="store_true", help="T=128 only, 2048 tokens/step (a smoke run)")
    ap.add_argument("--out", default=os.path.join("results", "bench", "lm_throughput.json"))
    args = ap.parse_args(argv)
    if args.steps < 5 and not args.quick:
        raise SystemExit("--steps: the benchmark protocol needs at least 5 timed steps")
    seq_lens = [128] if args.quick else [int(s) for s in args.seq_lens.split(",")]
    tokens_per_step = 2048 if args.quick else args.tokens_per_step

    env = _environment() if _environment else {"jax": jax.__version__, "platform": platform.platform(),
                                               "devices": [str(d) for d in jax.devices()]}
    result = {"benchmark": "lm_throughput", "environment": env,
              "model": {"vocab": VOCAB, "d_model": D_MODEL, "layers": LAYERS, "heads": HEADS,
                        "mlp": "swiglu", "positional": "rope", "attention_impl": "auto"},
              "training": [], "generation": []}
    print(f"{'T':>6} {'batch':>5} {'attn_jax tok/s':>15} {'baseline tok/s':>15} {'ratio':>7}", flush=True)
    for T in seq_lens:
        r = bench_training(T, tokens_per_step, args.steps)
        result["training"].append(r)
        print(f"{T:>6} {r['batch']:>5} {r['attn_jax']['tokens_per_s']:>15.0f} {r['baseline']['tokens_per_s']:>15.0f} "
              f"{r['speedup_vs_baseline']:>6.2f}x  (auto on cpu -> {r['attention_auto_cpu']})", flush=True)
    print(f"\n{'gen batch':>9} {'tokens/s':>10} {'median s':>9}", flush=True)
    for b in [int(x) for x in args.gen_batches.split(",")]:
        g = bench_generation(b, 16 if args.quick else 64, 16 if args.quick else 128, args.gen_repeats)
        result["generation"].append(g)
        print(f"{b:>9} {g['tokens_per_s']:>10.1f} {g['median_s']:>9.3f}", flush=True)
    result["environment"]["load_average_at_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

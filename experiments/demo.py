"""`make demo`: Multi-Query Associative Recall by linear attention at three state sizes.

    python -m experiments.demo [--steps=N] [--seeds=0,1,2] [--d_models=16,32,64] [--mixers=linear]
                               [--workers=2] [--workdir=runs/demo] [--write_results]

Claim shown (Zoology, Arora et al., 2023, arXiv:2312.04927, and Based, Arora et al., 2024,
arXiv:2402.18668): a linear-attention layer must hold every key-value pair of the context in a
fixed-size state, so its associative-recall accuracy grows with the state size (model width),
while attention's does not depend on a state.  The demo trains 2-layer decoders with the
``"linear"`` mixer (elu+1 feature map, short causal convolutions on q/k/v as in the Zoology and
Based models) at ``d_model`` in :data:`D_MODELS` (state ``2 x (d/2)^2`` per layer: 128, 512,
2048 numbers) and :data:`SEEDS` on MQAR (:mod:`experiments.tasks.mqar`) with the same data,
steps and learning rate, and reports the accuracy at the query positions per seed and as
mean / min / max over seeds.  Task size, steps and learning rate were chosen by measurement to
fit 5 minutes on 2 idle cores (EXPERIMENTS.md, "MQAR demo").

Softmax attention is not in the default run: at this budget it has not left the "one of the
context values" plateau (measured: MQAR 32x4, d_model 64, 1,500 steps at lr 1e-2 and 3e-3, RoPE,
ALiBi and T5 bias: accuracy 0.25-0.29, loss 1.39-1.43 = log 4); it forms the two-hop recall
circuit only after ~3,000+ steps on some seeds (issue 18), ten times the demo's budget.  The
short convolution lets linear attention bind each key to its value in one hop.  ``--mixers=softmax``
runs it anyway.

Deviations from Zoology, for the CPU budget: vocabulary :data:`TASK` ``vocab_size`` instead of
8192, no random filler tokens between the queries (``random_non_queries=False``), streamed
batches instead of a fixed training set, one learning rate with a constant schedule after warmup,
a fixed number of steps (the small widths may still be improving slowly when it ends).

Reference levels drawn in the figure (``K`` = number of value tokens ``vocab_size - vocab_size // 2``,
``N`` = key-value pairs): chance accuracy ``1 / K`` (loss ``log K``: uniform over the value tokens)
and the "one of the context values" plateau, accuracy ``1 / N`` (loss ``log N``), where a model
knows the answer is one of the N values in the context but not which one.

Every run trains in a worker process watched for deadlocks: a worker that uses no CPU for
``STALL_SEC`` is killed, its run reported as ``hung`` and the rest continue (a safeguard added
when the DeltaNet chunk form still used a batched ``lax.linalg.triangular_solve``, which
deadlocked intermittently in jaxlib's CPU LAPACK thread pool).  ``--workers`` processes run at
once (one per core), each on a contiguous share of the runs.

Writes ``<workdir>/{results.md, results.json, mqar_demo.png}`` and one run folder per
(mixer, width, seed) under ``<workdir>`` (``runs/demo``, ignored by git, wiped at start).  The
committed copies in ``results/demo/`` are rewritten only with ``--write_results``
(``make demo-figure``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import sys
import time

import ml_collections

# ----------------------------------------------------------------------------- demo settings
#: Optimizer updates per run (the budget knob: <= 5 min on 2 idle cores, compile included).
STEPS = 500
BATCH_SIZE = 64
#: Model widths per mixer (the state of a linear-attention layer grows as d_model ** 2 / heads).
D_MODELS = (16, 32, 64)
NUM_LAYERS = 2
NUM_HEADS = 2
#: MQAR 32 x 4: 4 key-value pairs (context of 8 tokens), 12 query slots, keys 1..15, values 16..32.
TASK = dict(vocab_size=33, seq_len=32, num_kv_pairs=4, power_a=0.01, random_non_queries=False)
SEEDS = (0, 1, 2)
LR = 1e-2
WARMUP = 50
#: Attention first (drawn in orange), then the fixed-state mixer(s).
DEMO_MIXERS = ("linear",)
BASELINES = ("softmax", "sliding_window")
#: Extra factory kwargs per mixer (``model.mixer_kwargs``).
MIXER_KWARGS: dict[str, dict] = {"linear": {"short_conv": True}}
#: Worker processes training at once (one per core).
WORKERS = 2
EVAL_POINTS = 10
EVAL_BATCHES = 4
#: A run counts as "solved" at this final valid accuracy.
SOLVED = 0.9
#: A worker using no CPU for this long is deadlocked (seen once with LAPACK triangular_solve on CPU).
STALL_SEC = 20
WORKDIR = "runs/demo"
RESULTS_DIR = "results/demo"
OUTPUTS = ("results.md", "results.json", "mqar_demo.png")


def demo_config(mixer: str, seed: int = 0, steps: int = STEPS,
                d_model: int = D_MODELS[-1]) -> ml_collections.ConfigDict:
    """The training config of one demo run."""
    from experiments.configs.base import with_task
    c = with_task("mqar", seed=seed, **TASK)
    c.model.update(mixer=mixer, d_model=d_model, num_layers=NUM_LAYERS, num_heads=NUM_HEADS)
    if mixer in MIXER_KWARGS:
        c.model.mixer_kwargs = {mixer: dict(MIXER_KWARGS[mixer])}
    c.optim.update(lr=LR, warmup_steps=min(WARMUP, max(1, steps // 10)), schedule="constant")
    c.train.update(steps=steps, batch_size=BATCH_SIZE, seed=seed, eval_every=max(1, steps // EVAL_POINTS),
                   eval_batches=EVAL_BATCHES, log_every=max(1, steps // EVAL_POINTS), checkpoint_every=steps,
                   keep_checkpoints=1, progress=False)
    return c


def state_size(mixer: str, d_model: int) -> int | None:
    """Recurrent state of one layer of the ``"linear"`` mixer: ``heads x Dk x Dv`` numbers with
    ``Dk = Dv = d_model / heads`` (the normaliser column not counted); None for other mixers."""
    if mixer != "linear":
        return None
    return NUM_HEADS * (d_model // NUM_HEADS) ** 2


def reference_levels() -> dict:
    """Chance and plateau accuracies / losses of :data:`TASK` (see the module docstring)."""
    k = TASK["vocab_size"] - TASK["vocab_size"] // 2
    n = TASK["num_kv_pairs"]
    return {"num_values": k, "chance_accuracy": 1.0 / k, "chance_loss": math.log(k),
            "plateau_accuracy": 1.0 / n, "plateau_loss": math.log(n)}


def demo_mixers(requested=None) -> list[str]:
    """The mixers to run: ``requested`` (checked against the registry) or :data:`DEMO_MIXERS`."""
    from experiments.sweep import check_mixers
    if requested:
        check_mixers(requested)
        return list(requested)
    return list(DEMO_MIXERS)


def _run_name(mixer: str, d_model: int, seed: int) -> str:
    return f"{mixer}-d{d_model}-s{seed}"


def arm_label(mixer: str, d_model: int) -> str:
    """The name of a (mixer, width) in tables and plots."""
    return f"{mixer} d{d_model}"


def _load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _train_one(mixer: str, d_model: int, seed: int, steps: int, workdir: str) -> dict:
    """Train ``(mixer, d_model, seed)`` fresh in ``workdir/<mixer>-d<d_model>-s<seed>``; returns
    its row (also written to ``demo_row.json`` there)."""
    from experiments.common.metrics import read_metrics
    from experiments.sweep import Cell, run_cell

    config = demo_config(mixer, seed, steps, d_model)
    run_dir = os.path.join(workdir, _run_name(mixer, d_model, seed))
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        row, _ = run_cell(config, Cell(mixer, d_model, LR, seed), run_dir)
        status, err = row["status"], None
    except Exception as e:                           # one broken run must not sink the demo
        row, status, err = {"params": ""}, "error", f"{type(e).__name__}: {e}"
    nan = float("nan")
    r = {"mixer": mixer, "d_model": d_model, "arm": arm_label(mixer, d_model), "seed": seed, "status": status,
         "params": row.get("params", ""),
         "valid_accuracy": row.get("final_valid_accuracy", nan), "valid_loss": row.get("final_valid_loss", nan),
         "steps": steps, "train_time_sec": time.perf_counter() - t0, "cpu_sec": time.process_time() - c0}
    if err:
        r["error"] = err[:500]
    metrics = read_metrics(run_dir)
    valid = [m for m in metrics if m["split"] == "valid"]
    r["curve"] = {"step": [m["step"] for m in valid], "accuracy": [m["accuracy"] for m in valid],
                  "loss": [m["loss"] for m in valid]}
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "demo_row.json"), "w") as f:
        json.dump(r, f)
    return r


def _line(r: dict) -> str:
    name = _run_name(r["mixer"], r["d_model"], r["seed"])
    if r["status"] == "ok":
        return (f"  {name:<22} valid acc {r['valid_accuracy']:.3f}  loss {r['valid_loss']:.3f}  "
                f"{r['train_time_sec']:.1f} s")
    return f"  {name:<22} {r['status']}" + (f"  ({r['error']})" if r.get("error") else "")


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` (all threads), from /proc; None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _split_jobs(jobs: list[tuple], workers: int) -> list[list[tuple]]:
    """Contiguous chunks of ``jobs`` (``(mixer, d_model, seed)``, ordered by mixer and width, so
    runs sharing a compiled program mostly share a worker), one per worker, cut where the summed
    cost estimate (``d_model``) is closest to an equal share."""
    workers = max(1, min(workers, len(jobs)))
    cost = [float(j[1]) for j in jobs]
    total, chunks, start = sum(cost), [], 0
    for w in range(1, workers):
        target = total * w / workers
        best, best_gap = None, None
        for i in range(start + 1, len(jobs) - (workers - w) + 1):
            gap = abs(sum(cost[:i]) - target)
            if best_gap is None or gap < best_gap:
                best, best_gap = i, gap
        chunks.append(jobs[start:best])
        start = best
    chunks.append(jobs[start:])
    return chunks


def _worker_command(chunk: list[tuple[str, int, int]], steps: int, workdir: str) -> list[str]:
    """The command line of a worker process training ``chunk`` (see :func:`main`)."""
    spec = ",".join(f"{m}:{d}:{s}" for m, d, s in chunk)
    return [sys.executable, "-m", "experiments.demo", "--worker", f"--steps={steps}", f"--jobs={spec}",
            f"--workdir={workdir}"]


def _run_isolated(jobs: list[tuple[str, int, int]], steps: int, workdir: str, log, workers: int) -> list[dict]:
    """Train ``jobs`` in ``workers`` worker processes at once; a worker that uses no CPU for
    STALL_SEC (a deadlocked XLA call) or exits without its rows is killed, its current run recorded
    as ``hung`` / ``error``, and a new worker continues with the rest of its chunk."""
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    row_path = lambda m, d, s: os.path.join(workdir, _run_name(m, d, s), "demo_row.json")  # noqa: E731

    def start(chunk):
        cmd = _worker_command(chunk, steps, workdir)
        return {"proc": subprocess.Popen(cmd, cwd=repo, env=env), "chunk": list(chunk), "cpu": -1.0,
                "changed": time.monotonic(), "stalled": False}

    active = [start(c) for c in _split_jobs(jobs, workers)]
    while active:
        time.sleep(1.0)
        for w in list(active):
            proc = w["proc"]
            if proc.poll() is None:                        # still running: progressing or deadlocked?
                cpu = _cpu_seconds(proc.pid)
                if cpu is not None and cpu > w["cpu"] + 0.05:
                    w["cpu"], w["changed"] = cpu, time.monotonic()
                    continue
                if cpu is None or time.monotonic() - w["changed"] <= STALL_SEC:
                    continue
                w["stalled"] = True
                proc.kill()
                proc.wait()
            active.remove(w)
            rest = [j for j in w["chunk"] if not os.path.exists(row_path(*j))]
            if rest and (w["stalled"] or proc.returncode != 0):
                mixer, d_model, seed = rest.pop(0)         # the run the worker was training
                r = {"mixer": mixer, "d_model": d_model, "arm": arm_label(mixer, d_model), "seed": seed,
                     "status": "hung" if w["stalled"] else "error", "params": "",
                     "valid_accuracy": float("nan"), "valid_loss": float("nan"), "steps": steps,
                     "train_time_sec": float("nan"), "cpu_sec": float("nan"),
                     "curve": {"step": [], "accuracy": [], "loss": []},
                     "error": (f"no CPU progress for {STALL_SEC} s (deadlock), worker killed" if w["stalled"]
                               else f"worker exited with code {proc.returncode}")}
                os.makedirs(os.path.dirname(row_path(mixer, d_model, seed)), exist_ok=True)
                with open(row_path(mixer, d_model, seed), "w") as f:
                    json.dump(r, f)
                log(_line(r))
            elif rest:
                raise RuntimeError(f"demo worker finished without results for {rest}")
            if rest:
                active.append(start(rest))
    rows = []
    for job in jobs:
        with open(row_path(*job)) as f:
            rows.append(json.load(f))
    return rows


def summarize(results: list[dict]) -> dict:
    """Per (mixer, width) label: final valid accuracy per seed, mean, min, max and the number of
    solved seeds."""
    out = {}
    for arm in dict.fromkeys(r["arm"] for r in results):
        accs = [r["valid_accuracy"] for r in results if r["arm"] == arm and r["status"] == "ok"]
        runs = [r for r in results if r["arm"] == arm]
        out[arm] = {"mixer": runs[0]["mixer"], "d_model": runs[0]["d_model"], "accuracies": accs,
                    "runs": len(runs), "failed": len(runs) - len(accs),
                  "mean": sum(accs) / len(accs) if accs else float("nan"),
                  "min": min(accs) if accs else float("nan"), "max": max(accs) if accs else float("nan"),
                  "solved": sum(a >= SOLVED for a in accs)}
    return out


def _title(steps: int, seeds, mixers, d_models) -> str:
    t = TASK
    fill = "random" if t["random_non_queries"] else "no"
    names = ", ".join(m + (" (short conv)" if MIXER_KWARGS.get(m, {}).get("short_conv") else "") for m in mixers)
    return (f"{names} attention, d_model {'/'.join(map(str, d_models))}, on MQAR seq {t['seq_len']}, "
            f"{t['num_kv_pairs']} key-value pairs, vocab {t['vocab_size']}, {fill} fillers; "
            f"{NUM_LAYERS} layers, {NUM_HEADS} heads; {steps} steps x batch {BATCH_SIZE}, lr {LR:g}; "
            f"{len(seeds)} seeds ({', '.join(map(str, seeds))})")


def plot(results: list[dict], summary: dict, path: str, steps: int, seeds) -> str:
    """Three panels: valid accuracy and valid loss against step (one line per seed) with the
    chance and plateau levels, and the final accuracy per mixer (bar = mean over seeds, dots =
    seeds, whisker = min..max)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = reference_levels()
    arms = list(summary)
    cmap = plt.get_cmap("viridis")
    colors = {a: ("tab:orange" if summary[a]["mixer"] in BASELINES else cmap(0.85 * i / max(1, len(arms) - 1)))
              for i, a in enumerate(arms)}
    fig, (ax_acc, ax_loss, ax_bar) = plt.subplots(1, 3, figsize=(15, 5.2))
    for r in results:
        c = r["curve"]
        if c["step"]:
            label = r["arm"] if r["seed"] == min(x["seed"] for x in results if x["arm"] == r["arm"]) else None
            ax_acc.plot(c["step"], c["accuracy"], color=colors[r["arm"]], marker=".", alpha=0.8, label=label)
            ax_loss.plot(c["step"], c["loss"], color=colors[r["arm"]], marker=".", alpha=0.8, label=label)
    for ax, key in ((ax_acc, "accuracy"), (ax_loss, "loss")):
        ax.axhline(ref[f"chance_{key}"], color="black", ls="--", lw=1,
                   label=f"chance: uniform over the {ref['num_values']} values (accuracy "
                         f"{ref['chance_accuracy']:.3f}, loss {ref['chance_loss']:.2f})")
        ax.axhline(ref[f"plateau_{key}"], color="grey", ls=":", lw=1.5,
                   label=f"plateau: one of the {TASK['num_kv_pairs']} context values (accuracy "
                         f"{ref['plateau_accuracy']:.3f}, loss {ref['plateau_loss']:.2f})")
        ax.set_xlabel("training step")
        ax.set_xlim(0, steps)
        ax.grid(alpha=0.3)
    ax_acc.set_ylim(0, 1.02)
    ax_acc.set_ylabel("valid accuracy at query positions")
    ax_acc.set_title("accuracy during training (one line per seed)", fontsize=10)
    ax_loss.set_ylim(0, max(ref["chance_loss"] + 0.5, 1.0))
    ax_loss.set_ylabel("valid loss at query positions (nats)")
    ax_loss.set_title("loss during training (one line per seed)", fontsize=10)
    handles, labels = ax_acc.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    for i, a in enumerate(arms):
        s = summary[a]
        if s["accuracies"]:
            ax_bar.bar(i, s["mean"], color=colors[a], alpha=0.6)
            ax_bar.errorbar(i, s["mean"], yerr=[[s["mean"] - s["min"]], [s["max"] - s["mean"]]], color="black",
                            capsize=6)
            ax_bar.scatter([i] * len(s["accuracies"]), s["accuracies"], color="black", zorder=3, s=18)
            ax_bar.text(i, 0.12, f"mean {s['mean']:.2f}\nsolved {s['solved']}/{s['runs']}", ha="center",
                        fontsize=8, bbox=dict(facecolor="white", alpha=0.8, edgecolor="none"))
        else:
            ax_bar.text(i, 0.05, "failed", ha="center", fontsize=8)
    ax_bar.axhline(ref["chance_accuracy"], color="black", ls="--", lw=1)
    ax_bar.axhline(ref["plateau_accuracy"], color="grey", ls=":", lw=1.5)
    ax_bar.set_xticks(range(len(arms)))
    states = {a: state_size(summary[a]["mixer"], summary[a]["d_model"]) for a in arms}
    ax_bar.set_xticklabels([a + ("" if states[a] is None else f"\nstate {states[a]}/layer") for a in arms], fontsize=8)
    ax_bar.set_xlim(-0.6, len(arms) - 0.4)
    ax_bar.set_ylim(0, 1.02)
    ax_bar.set_ylabel(f"final valid accuracy (step {steps})")
    ax_bar.set_title(f"final accuracy (bar: mean, dots: seeds, whisker: min..max;\nsolved: accuracy >= {SOLVED})",
                     fontsize=9)
    ax_bar.grid(alpha=0.3, axis="y")
    fig.suptitle(_title(steps, seeds, sorted({summary[a]["mixer"] for a in arms}),
                        sorted({summary[a]["d_model"] for a in arms})), fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _table(summary: dict) -> str:
    lines = ["| mixer | final valid accuracy per seed | mean | min..max | solved (acc >= %g) |" % SOLVED,
             "|---|---|---:|---:|---:|"]
    for m, s in summary.items():
        accs = ", ".join(f"{a:.3f}" for a in s["accuracies"]) + (f" ({s['failed']} failed)" if s["failed"] else "")
        lines.append(f"| {m} | {accs} | {s['mean']:.3f} | {s['min']:.3f}..{s['max']:.3f} | {s['solved']}/{s['runs']} |")
    return "\n".join(lines)


def run_demo(mixers=None, seeds=None, steps: int = STEPS, workdir: str = WORKDIR, d_models=None, log=print,
             isolate: bool = True, workers: int = WORKERS, write_results: bool = False,
             results_dir: str = RESULTS_DIR) -> dict:
    """Train every (mixer, seed) fresh in ``workdir`` and write ``results.md``, ``results.json``
    and ``mqar_demo.png`` there; with ``write_results`` also copy them to ``results_dir``.
    ``isolate``: train in ``workers`` watched worker processes (see :func:`_run_isolated`);
    otherwise one after the other in this process.  Returns the ``results.json`` payload."""
    import jax

    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: expected an int >= 1, got {workers!r}")
    seeds = list(SEEDS if seeds is None else seeds)
    if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ValueError(f"seeds: expected a non-empty list of ints >= 0, got {seeds!r}")
    d_models = list(D_MODELS if d_models is None else d_models)
    if not d_models or not all(isinstance(d, int) and d >= NUM_HEADS and d % NUM_HEADS == 0 for d in d_models):
        raise ValueError(f"d_models: expected a non-empty list of multiples of num_heads={NUM_HEADS}, got {d_models!r}")
    names = demo_mixers(mixers)                        # unknown names fail here, before training
    jobs = [(m, d, s) for m in names for d in d_models for s in seeds]
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir, exist_ok=True)
    t_start, load_start = time.perf_counter(), _load_average()
    log(f"MQAR demo: {', '.join(names)} x d_model {d_models} x seeds {seeds}; task {TASK}; {NUM_LAYERS} layers, "
        f"{NUM_HEADS} heads; {steps} steps x batch {BATCH_SIZE}, lr {LR:g} (constant after {WARMUP} warmup)")
    if isolate:
        results = _run_isolated(jobs, steps, workdir, log, workers)
    else:
        results = []
        for m, d, s in jobs:
            results.append(_train_one(m, d, s, steps, workdir))
            log(_line(results[-1]))
    total = time.perf_counter() - t_start
    summary = summarize(results)
    payload = {
        "task": {"name": "mqar", **TASK}, "reference_levels": reference_levels(),
        "model": {"d_models": d_models, "num_layers": NUM_LAYERS, "num_heads": NUM_HEADS,
                  "mixer_kwargs": MIXER_KWARGS},
        "train": {"steps": steps, "batch_size": BATCH_SIZE, "lr": LR, "schedule": "constant",
                  "warmup_steps": WARMUP, "seeds": seeds},
        "mixers": names, "summary": summary, "results": results, "total_wall_sec": total,
        "worker_cpu_sec": sum(r["cpu_sec"] for r in results if r["cpu_sec"] == r["cpu_sec"]),
        "load_average_start": load_start, "load_average_end": _load_average(),
        "jax": jax.__version__, "cpu_count": os.cpu_count(), "python": platform.python_version(),
    }
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(payload, f, indent=2)
    table = _table(summary)
    ref = reference_levels()
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(f"# MQAR demo\n\n{_title(steps, seeds, names, d_models)}.\n\nAccuracy at the query positions; chance "
                f"{ref['chance_accuracy']:.3f} (loss {ref['chance_loss']:.2f}), 'one of the context values' plateau "
                f"{ref['plateau_accuracy']:.3f} (loss {ref['plateau_loss']:.2f}). Total wall time {total:.0f} s "
                f"(compilation included; load average {load_start} at start).\n\n{table}\n")
    plot(results, summary, os.path.join(workdir, "mqar_demo.png"), steps, seeds)
    log("\n" + table)
    log(f"\ntotal {total:.1f} s; wrote {workdir}/{{{', '.join(OUTPUTS)}}}")
    if write_results:
        copy_results(workdir, results_dir)
        log(f"copied them to {results_dir}/")
    return payload


def copy_results(workdir: str, results_dir: str = RESULTS_DIR) -> list[str]:
    """Copy the demo's outputs (:data:`OUTPUTS`) from ``workdir`` to ``results_dir`` (the tracked
    copy, ``make demo-figure``); returns the written paths."""
    missing = [n for n in OUTPUTS if not os.path.exists(os.path.join(workdir, n))]
    if missing:
        raise ValueError(f"workdir: expected the demo outputs {list(OUTPUTS)} in {workdir!r}, missing {missing}")
    os.makedirs(results_dir, exist_ok=True)
    paths = [os.path.join(results_dir, n) for n in OUTPUTS]
    for name, dst in zip(OUTPUTS, paths):
        shutil.copyfile(os.path.join(workdir, name), dst)
    return paths


# ----------------------------------------------------------------------------- command line
def _parse_jobs(spec: list[str]) -> list[tuple[str, int, int]]:
    jobs = []
    for item in spec:
        parts = item.split(":")
        if len(parts) != 3 or not (parts[1].isdigit() and parts[2].isdigit()):
            raise ValueError(f"--jobs: expected mixer:d_model:seed items, got {item!r}")
        jobs.append((parts[0], int(parts[1]), int(parts[2])))
    return jobs


def main(argv):
    from absl import app, flags, logging
    logging.set_verbosity(logging.WARNING)             # orbax logs every checkpoint write at INFO
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    F = flags.FLAGS
    from experiments.sweep import SweepError
    try:
        if F.worker:                                   # internal: train in this process (see _run_isolated)
            for mixer, d_model, seed in _parse_jobs(F.jobs or []):
                print(_line(_train_one(mixer, d_model, seed, F.steps, F.workdir)), flush=True)
            return
        seeds = [int(s) for s in F.seeds] if F.seeds else None
        d_models = [int(d) for d in F.d_models] if F.d_models else None
        run_demo(mixers=F.mixers, seeds=seeds, d_models=d_models, steps=F.steps, workdir=F.workdir,
                 isolate=not F.in_process,
                 workers=F.workers, write_results=F.write_results)
    except (SweepError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def cli():
    from absl import app, flags
    flags.DEFINE_integer("steps", STEPS, "Optimizer updates per run.", lower_bound=1)
    flags.DEFINE_list("mixers", None, f"Mixers to train (default: {','.join(DEMO_MIXERS)}).")
    flags.DEFINE_list("d_models", None, f"Model widths per mixer (default: {','.join(map(str, D_MODELS))}).")
    flags.DEFINE_list("seeds", None, f"Seeds per mixer (default: {','.join(map(str, SEEDS))}).")
    flags.DEFINE_integer("workers", WORKERS, "Worker processes training at once.", lower_bound=1)
    flags.DEFINE_string("workdir", WORKDIR, "Run directories and outputs (wiped at start).")
    flags.DEFINE_bool("write_results", False, f"Also copy the outputs to {RESULTS_DIR}/ (tracked files).")
    flags.DEFINE_bool("in_process", False, "Train in this process (no deadlock watchdog).")
    flags.DEFINE_bool("worker", False, "Internal: a worker process of the watchdog.")
    flags.DEFINE_list("jobs", None, "Internal: the worker's mixer:seed runs.")
    app.run(main)


if __name__ == "__main__":
    cli()

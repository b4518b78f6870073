"""`make demo`: Multi-Query Associative Recall with 11 token mixers (attention and linear / recurrent).

    python -m experiments.demo [--steps=N] [--mixers=softmax,gla] [--workdir=runs/demo] [--out=results/demo]

Trains one 2-layer decoder per mixer of :data:`DEMO_MIXERS` (softmax attention, sliding-window
attention and nine linear / recurrent mixers; ``--mixers`` picks any registered decoder mixers) on MQAR
(Zoology, Arora et al., 2023, arXiv:2312.04927; :mod:`experiments.tasks.mqar`) with the same
width, data, steps and seed, and reports the accuracy at the query positions.  Softmax attention
can look every key up; sliding-window attention (window 8) cannot see the context from most
query positions; the linear mixers must squeeze all key-value pairs into a fixed-size state.

Deviations from Zoology's setup, for a CPU budget of 5 minutes (compilation included): vocabulary
128 instead of 8192 (keys 1..63, values 64..127), ``STEPS`` (150) streamed batches of 32 instead of
64 epochs over a fixed set, one learning rate and one seed.  At this budget no model has formed the two-hop
recall circuit yet (softmax attention, in this library and in an independent pure-JAX model, stays
near the "one of the context values" plateau for > 4000 steps at T=32, 4 pairs); the table shows
how far each mixer gets in the first ``STEPS`` steps, not the capacity separation Zoology measures —
use ``experiments.sweep`` (``experiments/configs/mqar.py``, thousands of steps, LR grid, seeds) for that.

Each mixer trains in a worker process watched for deadlocks: a worker that uses no CPU for
``STALL_SEC`` is killed, its mixer reported as ``hung`` and the rest continue (a safeguard added
when the DeltaNet chunk form still used a batched ``lax.linalg.triangular_solve``, which
deadlocked intermittently in jaxlib's CPU LAPACK thread pool; the UT inverse is now matmuls only).

Writes ``results/demo/{results.md, results.json, mqar_accuracy.png, loss_curves.png}``; runs
go to ``runs/demo/<mixer>`` (wiped at start, so the demo always trains fresh).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time

import ml_collections

# ----------------------------------------------------------------------------- demo settings
#: Optimizer updates per mixer (the demo's budget knob: <= 5 min on 2 idle cores, compile included).
STEPS = 150
BATCH_SIZE = 32
D_MODEL = 64
NUM_LAYERS = 2
NUM_HEADS = 2
#: MQAR: sequence length 64 with 8 key-value pairs (context of 16 tokens, 24 query slots).
TASK = dict(vocab_size=128, seq_len=64, num_kv_pairs=8, power_a=0.01)
SEED = 0
#: Learning rate per mixer; mixers not listed use DEFAULT_LR.
DEFAULT_LR = 3e-3
LRS: dict[str, float] = {}
#: Extra factory kwargs per mixer (``model.mixer_kwargs``); empty = every mixer at its defaults.
MIXER_KWARGS: dict[str, dict] = {}
#: Attention baselines, listed first and drawn in a second colour.
BASELINES = ("softmax", "sliding_window")
EVAL_POINTS = 8
#: A worker using no CPU for this long is deadlocked (seen once with LAPACK triangular_solve on CPU).
STALL_SEC = 20
EVAL_BATCHES = 4
WORKDIR = "runs/demo"
OUT_DIR = "results/demo"


def demo_config(mixer: str, steps: int = STEPS) -> ml_collections.ConfigDict:
    from experiments.configs.base import with_task
    c = with_task("mqar", seed=SEED, **TASK)
    c.model.update(mixer=mixer, d_model=D_MODEL, num_layers=NUM_LAYERS, num_heads=NUM_HEADS)
    if mixer in MIXER_KWARGS:
        c.model.mixer_kwargs = {mixer: dict(MIXER_KWARGS[mixer])}
    c.optim.update(lr=LRS.get(mixer, DEFAULT_LR), warmup_steps=min(50, max(1, steps // 10)))
    c.train.update(steps=steps, batch_size=BATCH_SIZE, seed=SEED, eval_every=max(1, steps // EVAL_POINTS),
                   eval_batches=EVAL_BATCHES, log_every=max(1, min(25, steps // 4)), checkpoint_every=steps,
                   keep_checkpoints=1, progress=False)
    return c


#: The demo's mixers, fixed so that later registrations do not grow its 5-minute budget.
DEMO_MIXERS = ("softmax", "sliding_window", "based", "deltanet", "gated_deltanet", "gla", "lightning", "linear",
               "mega", "retnet", "ssd")


def demo_mixers(requested=None) -> list[str]:
    """The mixers to run: ``requested`` (checked against the registry) or :data:`DEMO_MIXERS`,
    attention baselines first."""
    from experiments.sweep import check_mixers
    if requested:
        check_mixers(requested)
        return list(requested)
    return [m for m in BASELINES if m in DEMO_MIXERS] + [m for m in DEMO_MIXERS if m not in BASELINES]


def _load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _table(results: list[dict]) -> str:
    lines = ["| mixer | params | valid accuracy (queries) | valid loss | lr | train time (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        acc = r["status"] if r["status"] != "ok" else f"{r['valid_accuracy']:.3f}"
        loss = "" if r["status"] != "ok" else f"{r['valid_loss']:.3f}"
        t = r["train_time_sec"]
        lines.append(f"| {r['mixer']} | {r['params']} | {acc} | {loss} | {r['lr']:g} | "
                     f"{'' if t != t else f'{t:.1f}'} |")
    return "\n".join(lines)


def _train_one(name: str, steps: int, workdir: str) -> dict:
    """Train ``name`` fresh in ``workdir/<name>``; returns its results row (also written to
    ``workdir/<name>/demo_row.json``)."""
    from experiments.common.metrics import read_metrics
    from experiments.sweep import Cell, run_cell

    config = demo_config(name, steps)
    cell = Cell(name, D_MODEL, float(config.optim.lr), SEED)
    t0 = time.perf_counter()
    try:
        row, _ = run_cell(config, cell, os.path.join(workdir, name))
        status, err = row["status"], None
    except Exception as e:                           # one broken mixer must not sink the demo
        row, status, err = {"workdir": os.path.join(workdir, name), "params": ""}, "error", f"{type(e).__name__}: {e}"
    dt = time.perf_counter() - t0
    nan = float("nan")
    r = {"mixer": name, "status": status, "params": row.get("params", ""),
         "valid_accuracy": row.get("final_valid_accuracy", nan), "valid_loss": row.get("final_valid_loss", nan),
         "best_valid_accuracy": row.get("best_valid_accuracy", nan), "final_train_loss": row.get("final_train_loss", nan),
         "lr": cell.lr, "steps": steps, "train_time_sec": dt}
    if err:
        r["error"] = err[:500]
    metrics = read_metrics(row["workdir"])
    r["curves"] = {split: ([m["step"] for m in metrics if m["split"] == split],
                           [m["loss"] for m in metrics if m["split"] == split]) for split in ("train", "valid")}
    os.makedirs(row["workdir"], exist_ok=True)
    with open(os.path.join(row["workdir"], "demo_row.json"), "w") as f:
        json.dump(r, f)
    return r


def _line(r: dict) -> str:
    if r["status"] == "ok":
        return (f"  {r['mixer']:<16} valid acc {r['valid_accuracy']:.3f}  loss {r['valid_loss']:.3f}  "
                f"params {r['params']}  {r['train_time_sec']:.1f} s")
    return f"  {r['mixer']:<16} {r['status']}  {r['train_time_sec']:.1f} s" + (f"  ({r['error']})" if r.get("error") else "")


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` (all threads), from /proc; None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _run_isolated(names: list[str], steps: int, workdir: str, log) -> list[dict]:
    """Train ``names`` in a worker process; a worker that uses no CPU for STALL_SEC (a deadlocked
    XLA call) or exits without its row is killed, its current mixer recorded as ``hung`` /
    ``error``, and a new worker continues with the rest."""
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    row_path = lambda n: os.path.join(workdir, n, "demo_row.json")  # noqa: E731
    pending = list(names)
    while pending:
        cmd = [sys.executable, "-m", "experiments.demo", "--worker", f"--steps={steps}",
               f"--mixers={','.join(pending)}", f"--workdir={workdir}"]
        proc = subprocess.Popen(cmd, cwd=repo, env=env)
        last_cpu, last_change, stalled = -1.0, time.monotonic(), False
        while proc.poll() is None:
            time.sleep(1.0)
            cpu = _cpu_seconds(proc.pid)
            if cpu is not None and cpu > last_cpu + 0.05:
                last_cpu, last_change = cpu, time.monotonic()
            elif cpu is not None and time.monotonic() - last_change > STALL_SEC:
                stalled = True
                proc.kill()
                proc.wait()
        done = [n for n in pending if os.path.exists(row_path(n))]
        rest = [n for n in pending if n not in done]
        if rest and (stalled or proc.returncode != 0):
            bad = rest.pop(0)                          # the mixer the worker was training
            status = "hung" if stalled else "error"
            r = {"mixer": bad, "status": status, "params": "", "valid_accuracy": float("nan"),
                 "valid_loss": float("nan"), "lr": LRS.get(bad, DEFAULT_LR), "steps": steps,
                 "train_time_sec": float("nan"), "curves": {},
                 "error": (f"no CPU progress for {STALL_SEC} s (deadlock), worker killed" if stalled
                           else f"worker exited with code {proc.returncode}")}
            os.makedirs(os.path.dirname(row_path(bad)), exist_ok=True)
            with open(row_path(bad), "w") as f:
                json.dump(r, f)
            log(_line({**r, "train_time_sec": 0.0}))
        elif rest and proc.returncode == 0:
            raise RuntimeError(f"demo worker finished without results for {rest}")
        pending = rest
    rows = []
    for n in names:
        with open(row_path(n)) as f:
            rows.append(json.load(f))
    return rows


def run_demo(mixers=None, steps: int = STEPS, workdir: str = WORKDIR, out_dir: str = OUT_DIR, log=print,
             isolate: bool = True) -> dict:
    """Train every mixer fresh and write the results; returns the ``results.json`` payload.
    ``isolate``: train in a worker process guarded against deadlocks (see :func:`_run_isolated`);
    otherwise in this process."""
    import jax

    from experiments.common import plots

    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    names = demo_mixers(mixers)                        # unknown names fail here, before training
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir, exist_ok=True)
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.perf_counter()
    load_start = _load_average()
    log(f"MQAR demo: {len(names)} mixers ({', '.join(names)}); task {TASK}; d_model {D_MODEL}, "
        f"{NUM_LAYERS} layers, {NUM_HEADS} heads; {steps} steps x batch {BATCH_SIZE}; seed {SEED}")
    if isolate:
        results = _run_isolated(names, steps, workdir, log)
    else:
        results = []
        for name in names:
            results.append(_train_one(name, steps, workdir))
            log(_line(results[-1]))
    curves = {r["mixer"]: r.pop("curves") for r in results}
    total = time.perf_counter() - t_start
    table = _table(results)
    payload = {
        "task": {"name": "mqar", **TASK, "seed": SEED},
        "model": {"d_model": D_MODEL, "num_layers": NUM_LAYERS, "num_heads": NUM_HEADS},
        "train": {"steps": steps, "batch_size": BATCH_SIZE, "default_lr": DEFAULT_LR, "lrs": LRS},
        "mixer_kwargs": MIXER_KWARGS,
        "mixers": names, "results": results, "total_wall_sec": total,
        "load_average_start": load_start, "load_average_end": _load_average(),
        "jax": jax.__version__, "cpu_count": os.cpu_count(), "python": platform.python_version(),
    }
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(payload, f, indent=2)
    header = (f"# MQAR demo\n\nTask: MQAR {TASK} (accuracy at query positions only). Model: {NUM_LAYERS}-layer "
              f"decoder, d_model {D_MODEL}, {NUM_HEADS} heads. {steps} steps x batch {BATCH_SIZE}, seed {SEED}. "
              f"Mixer kwargs: {MIXER_KWARGS}. "
              f"Train time includes JAX compilation. Total wall time {total:.0f} s "
              f"(load average {load_start} at start).\n\n")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(header + table + "\n")
    ok = {r["mixer"]: (r["valid_accuracy"] if r["status"] == "ok" else float("nan")) for r in results}
    plots.bar_chart(ok, os.path.join(out_dir, "mqar_accuracy.png"), ylabel="valid accuracy at query positions",
                    title=f"MQAR T={TASK['seq_len']}, {TASK['num_kv_pairs']} kv pairs, d_model {D_MODEL}, "
                          f"{steps} steps", highlight=BASELINES)
    plots.loss_curves({k: v for k, v in curves.items() if v}, os.path.join(out_dir, "loss_curves.png"),
                      title=f"MQAR, d_model {D_MODEL}")
    log("\n" + table)
    log(f"\ntotal {total:.1f} s; wrote {out_dir}/results.md, results.json, mqar_accuracy.png, loss_curves.png")
    return payload


# ----------------------------------------------------------------------------- command line
def main(argv):
    from absl import app, flags, logging
    logging.set_verbosity(logging.WARNING)             # orbax logs every checkpoint write at INFO
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    F = flags.FLAGS
    from experiments.sweep import SweepError
    try:
        if F.worker:                                   # internal: train in this process (see _run_isolated)
            for name in F.mixers:
                print(_line(_train_one(name, F.steps, F.workdir)), flush=True)
            return
        run_demo(mixers=F.mixers, steps=F.steps, workdir=F.workdir, out_dir=F.out, isolate=not F.in_process)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def cli():
    from absl import app, flags
    flags.DEFINE_integer("steps", STEPS, "Optimizer updates per mixer.", lower_bound=1)
    flags.DEFINE_list("mixers", None, "Mixers to train (default: DEMO_MIXERS, 11 mixers).")
    flags.DEFINE_string("workdir", WORKDIR, "Run directories (wiped at start).")
    flags.DEFINE_string("out", OUT_DIR, "Where results.md/json and the plots go.")
    flags.DEFINE_bool("in_process", False, "Train in this process (no deadlock watchdog).")
    flags.DEFINE_bool("worker", False, "Internal: the worker process of the watchdog.")
    app.run(main)


if __name__ == "__main__":
    cli()

"""Train a model on an experiment task; resumable, deterministic for a given seed.

    python -m experiments.train --config=experiments/configs/mqar.py:64x4 --workdir=runs/mqar \
        [--config.train.steps=200 --config.model.mixer=sliding_window ...]
        [--config.model.mixer_kwargs.sliding_window.window=16]   # new mixer_kwargs entries too

The importable API is :func:`train_and_evaluate` (used by sweeps).  The workdir receives
``config.json`` (the resolved config), ``checkpoints/<step>`` (orbax; periodic, the newest
``keep_checkpoints`` kept, resumed automatically), ``metrics.jsonl`` and ``tb/`` (TensorBoard),
and ``summary.json`` at the end.  Batch ``i`` of the run is ``task.batch("train", i, batch_size)``,
so data is a function of the step and a resumed run equals an uninterrupted one exactly.

Step ``s`` means "after ``s`` optimizer updates"; metrics logged at step ``s`` are the means over
the updates since the previous log (``train``) or over ``eval_batches`` valid batches (``valid``).
A non-finite loss or gradient stops the run with ``FloatingPointError`` naming the first bad
step, before any checkpoint past it is written.  ``train.debug_nan_at_step=k`` (tests only)
multiplies the loss of update ``k`` by NaN to exercise that path.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from experiments.common import losses
from experiments.common.checkpoint import Checkpointer
from experiments.common.cli import adopt_key_flags, define, quiet_orbax
from experiments.common.config import (ConfigError, apply_mixer_kwargs, check_cli_overrides, config_fields_help,
                                       make_task, split_mixer_kwargs, validate)
from experiments.common.metrics import MetricWriter, read_metrics
from experiments.common.models import build_model, forward, param_count
from experiments.common.optim import make_optimizer
from experiments.common.progress import Progress

__all__ = ["train_and_evaluate", "evaluate", "Trainer", "config_from_argv"]


def _committed(tree):
    """On the default device and committed, like restored checkpoints and jit outputs (jit's
    cache key includes committedness: mixing the two would recompile the steps)."""
    return jax.device_put(tree, jax.devices()[0])


def _acc_zeros():
    return _committed({"loss": jnp.float32(0), "accuracy": jnp.float32(0), "weight": jnp.float32(0),
            "grad_norm": jnp.float32(0), "updates": jnp.int32(0), "first_bad": jnp.int32(-1)})


#: Compiled steps per (model, optimizer, task) config: runs in one process with the same config
#: (sweeps over seeds, tests, generate/evaluate after training) reuse the executables.
_STEP_CACHE: dict[str, tuple] = {}


def _make_steps(graphdef, tx, kind: str, z_loss: float, nan_at: int, deterministic: bool):
    """The jitted ``train_step(state, batch) -> state`` (state donated) and ``eval_step``."""

    def train_step(state, batch):
        step = state["step"] + 1                                    # the update being made

        def loss_of(params):
            rest = jax.tree.map(lambda x: x, state["rest"])         # fresh Variables in this trace (RNGs)
            model = nnx.merge(graphdef, params, rest)
            out = forward(model, batch["inputs"], deterministic=deterministic)
            loss, sums = losses.loss_fn(kind, out, batch, z_loss)
            if nan_at >= 0:                                         # test hook (see module docstring)
                loss = loss * jnp.where(step == nan_at, jnp.nan, 1.0)
            return loss, (sums, nnx.split(model, nnx.Param, ...)[2])

        (loss, (sums, rest)), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        gnorm = optax.tree.norm(grads)
        acc = state["acc"]
        bad = ~(jnp.isfinite(loss) & jnp.isfinite(gnorm))
        acc = {"loss": acc["loss"] + sums["loss"], "accuracy": acc["accuracy"] + sums.get("accuracy", 0.0),
               "weight": acc["weight"] + sums["weight"], "grad_norm": acc["grad_norm"] + gnorm,
               "updates": acc["updates"] + 1,
               "first_bad": jnp.where((acc["first_bad"] < 0) & bad, step, acc["first_bad"])}
        return {"params": params, "rest": rest, "opt": opt, "acc": acc, "step": step}

    def eval_step(params, rest, batch):
        out = forward(nnx.merge(graphdef, params, rest), batch["inputs"], deterministic=True)
        return losses.metric_sums(kind, out, batch)

    return jax.jit(train_step, donate_argnums=(0,)), jax.jit(eval_step)


class Trainer:
    """The model, optimizer and jitted steps of a config; ``state`` is the full training state
    (a pytree: params, other model state such as dropout RNGs, optimizer state, metric sums, step)."""

    def __init__(self, config: ml_collections.ConfigDict):
        validate(config)
        self.config = config
        self.task = task = make_task(config.task)
        self.kind = task.kind
        model = build_model(config, task, rngs=nnx.Rngs(config.train.seed))
        self.param_count = param_count(model)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        t = config.train
        key = json.dumps([config.model.to_dict(), config.optim.to_dict(), t.steps, t.bf16, t.debug_nan_at_step,
                          {k: v for k, v in config.task.to_dict().items() if k != "seed"}], sort_keys=True, default=str)
        if key not in _STEP_CACHE:
            tx, schedule = make_optimizer(config.optim, t.steps)
            _STEP_CACHE[key] = (graphdef, tx, schedule) + _make_steps(
                graphdef, tx, self.kind, float(config.optim.z_loss), int(t.debug_nan_at_step),
                not config.model.dropout_rate)
        self.graphdef, self.tx, self.schedule, self.train_step, self.eval_step = _STEP_CACHE[key]
        self.state = _committed({"params": params, "rest": rest, "opt": self.tx.init(params),
                                 "acc": _acc_zeros(), "step": jnp.int32(0)})

    def model(self, state=None) -> nnx.Module:
        state = self.state if state is None else state
        return nnx.merge(self.graphdef, state["params"], state["rest"])

    def evaluate(self, num_batches: int, batch_size: int) -> dict:
        total = None
        for i in range(num_batches):
            sums = self.eval_step(self.state["params"], self.state["rest"], self.task.batch("valid", i, batch_size))
            total = sums if total is None else jax.tree.map(jnp.add, total, sums)
        return losses.means(jax.device_get(total))

    def check_finite(self, last_good: int | None) -> None:
        bad = int(self.state["acc"]["first_bad"])
        if bad >= 0:
            good = f"step {last_good}" if last_good is not None else "none"
            raise FloatingPointError(f"train.steps: non-finite loss or gradient at step {bad}; training stopped "
                                     f"(last good checkpoint: {good})")

    def pop_train_metrics(self) -> dict:
        acc = jax.device_get(self.state["acc"])
        self.state = {**self.state, "acc": _acc_zeros()}
        step = int(self.state["step"])
        out = losses.means({k: acc[k] for k in ("loss", "accuracy", "weight") if k != "accuracy" or self.kind != "regress"})
        out["grad_norm"] = float(acc["grad_norm"]) / max(int(acc["updates"]), 1)
        out["lr"] = float(self.schedule(step - 1))
        return out


def _summary(config, workdir, trainer, wall, start) -> dict:
    lines = read_metrics(workdir)
    train = [m for m in lines if m["split"] == "train"]
    valid = [m for m in lines if m["split"] == "valid"]
    best = max((m["accuracy"] for m in valid if "accuracy" in m), default=None)
    return {"steps": int(trainer.state["step"]), "final_train": train[-1] if train else None,
            "final_valid": valid[-1] if valid else None, "best_valid_accuracy": best,
            "best_valid_loss": min((m["loss"] for m in valid), default=None),
            "param_count": trainer.param_count, "resumed_from_step": start, "wall_time_sec": wall,
            "config": config.to_dict()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train (resuming from ``workdir`` if it holds a checkpoint), evaluate, return the summary."""
    t_start = time.perf_counter()
    config = ml_collections.ConfigDict(config.to_dict())
    trainer = Trainer(config)
    t = config.train
    for field in ("steps", "batch_size", "eval_every", "eval_batches", "log_every", "checkpoint_every",
                  "keep_checkpoints"):
        if not isinstance(t[field], int) or t[field] < 1:
            raise ConfigError(f"config.train.{field}: expected an int >= 1, got {t[field]!r}")
    os.makedirs(workdir, exist_ok=True)
    cfg_path = os.path.join(workdir, "config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            old = json.load(f)
        changed = [k for k in ("task", "model", "optim") if old.get(k) != json.loads(config.to_json())[k]]
        if changed:
            logging.warning("config.json in %s differs from this run's config in %s", workdir, changed)
    with open(cfg_path, "w") as f:
        f.write(config.to_json(indent=2, sort_keys=True))

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), t.keep_checkpoints)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainer.state)
    last_good, restored = ckpt.restore_latest(abstract)
    if restored is not None:
        trainer.state = restored
        logging.info("resumed from checkpoint step %d in %s", last_good, workdir)
    start = int(trainer.state["step"])
    writer = MetricWriter(workdir, resume_step=start)
    bar = Progress(t.steps, initial=start, enabled=t.progress)
    tokens, window_t0, window_steps = 0, time.perf_counter(), 0
    try:
        for s in range(start + 1, t.steps + 1):
            batch = trainer.task.batch("train", s - 1, t.batch_size)
            trainer.state = trainer.train_step(trainer.state, batch)
            tokens += int(np.asarray(batch["weights"]).size)
            window_steps += 1
            postfix = {}
            if s % t.log_every == 0 or s == t.steps:
                trainer.check_finite(last_good)
                m = trainer.pop_train_metrics()
                dt = time.perf_counter() - window_t0
                m.update(tokens_per_sec=tokens / dt, steps_per_sec=window_steps / dt,
                         elapsed_sec=time.perf_counter() - t_start)
                writer.write(s, "train", m)
                tokens, window_t0, window_steps = 0, time.perf_counter(), 0
                postfix = {"loss": m["loss"], "tok/s": f"{m['tokens_per_sec']:.0f}"}
            if s % t.eval_every == 0 or s == t.steps:
                trainer.check_finite(last_good)
                t0 = time.perf_counter()
                m = trainer.evaluate(t.eval_batches, t.batch_size)
                writer.write(s, "valid", {**m, "eval_sec": time.perf_counter() - t0})
                postfix["valid_loss"] = m["loss"]
                window_t0 += time.perf_counter() - t0                 # keep eval out of tokens/s
            if s % t.checkpoint_every == 0 or s == t.steps:
                trainer.check_finite(last_good)
                ckpt.save(s, trainer.state)
                last_good = s
            bar.update(1, **postfix)
    finally:
        bar.close()
        writer.close()
        ckpt.close()
    summary = _summary(config, workdir, trainer, time.perf_counter() - t_start, start)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def restore_trainer(workdir: str, overrides: dict | None = None) -> tuple[Trainer, int]:
    """The Trainer of ``workdir/config.json`` with its newest good checkpoint (generate / evaluate).

    Read-only: nothing in ``workdir`` is created, moved or deleted."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"workdir: no config.json in {workdir!r} (not a training workdir)")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    for k, v in (overrides or {}).items():
        section, key = k.split(".")
        config[section][key] = v
    trainer = Trainer(config)
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise ConfigError(f"workdir: no checkpoint directory {directory!r}")
    # Readers never change the workdir: bad checkpoints are skipped, not set aside (the trainer does that).
    ckpt = Checkpointer(directory, config.train.keep_checkpoints, read_only=True)
    try:
        step, state = ckpt.restore_latest(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                       trainer.state))
    finally:
        ckpt.close()
    if state is None:
        raise ConfigError(f"workdir: no restorable checkpoint in {os.path.join(workdir, 'checkpoints')}")
    trainer.state = state
    return trainer, step


# ----------------------------------------------------------------------------- command line
CONFIG_HELP = ("Config file, experiments/configs/<task>.py[:arg] (each file documents its :arg). Override any "
               "field with --config.<section>.<field>=value, mixer arguments with "
               "--config.model.mixer_kwargs.<mixer>.<kwarg>=value. Fields: {fields}. --print_config prints "
               "the resolved config and exits.")


def _define_flags():
    if "config" not in flags.FLAGS:
        config_flags.DEFINE_config_file("config", None, CONFIG_HELP.format(fields=config_fields_help()),
                                        lock_config=False)
    define("string", "workdir", None, "Directory of checkpoints, metrics and summary (created if needed; "
                                      "a run resumes from its newest good checkpoint).")
    define("bool", "print_config", False, "Print the resolved config (--config plus overrides) and exit.")
    adopt_key_flags()


_MIXER_KWARGS: dict = {}      # --config.model.mixer_kwargs.<mixer>.<kwarg>=v, applied in main


def _flags_parser(argv: list[str]) -> list[str]:
    try:
        check_cli_overrides(argv)
        argv, extra = split_mixer_kwargs(argv)
    except ConfigError as e:
        print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
        sys.exit(1)
    _MIXER_KWARGS.update(extra)
    sys.argv = list(argv)                        # config_flags reads its overrides from sys.argv
    return app.parse_flags_with_usage(argv)


def config_from_argv(argv: list[str]) -> tuple[ml_collections.ConfigDict, str]:
    """Parse ``argv`` as the command line does (own FlagValues, so it can be called repeatedly;
    for tests and wrappers): ``(config, workdir)``."""
    check_cli_overrides(argv)
    argv, extra = split_mixer_kwargs(argv)
    fv = flags.FlagValues()
    config = config_flags.DEFINE_config_file("config", None, "Config file.", flag_values=fv, sys_argv=list(argv),
                                             lock_config=False)
    workdir = flags.DEFINE_string("workdir", None, "Workdir.", flag_values=fv)
    fv(argv)
    apply_mixer_kwargs(config.value, extra)
    return config.value, workdir.value


def run_cli(config: ml_collections.ConfigDict, workdir: str) -> int:
    """Train; print a brief summary (exit code 0) or the error (exit code 1)."""
    try:
        summary = train_and_evaluate(config, workdir)
    except (ConfigError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    brief = {k: summary[k] for k in ("steps", "final_train", "final_valid", "best_valid_accuracy", "param_count")}
    print(json.dumps(brief, indent=1))
    return 0


def main(argv):
    del argv
    quiet_orbax()
    if flags.FLAGS.config is None:
        raise app.UsageError("--config is required (--helpshort lists the flags and the config fields)")
    apply_mixer_kwargs(flags.FLAGS.config, _MIXER_KWARGS)
    if flags.FLAGS.print_config:
        print(flags.FLAGS.config)
        sys.exit(0)
    if not flags.FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    sys.exit(run_cli(flags.FLAGS.config, flags.FLAGS.workdir))


def cli():
    _define_flags()
    app.run(main, flags_parser=_flags_parser)


if __name__ == "__main__":
    cli()

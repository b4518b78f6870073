"""Grid sweeps over mixers × d_model × learning rate × seed, reported as Zoology reports MQAR.

    python -m experiments.sweep --config=experiments/configs/mqar.py:64x4 \
        --mixers=softmax,gla,retnet --d_models=32,64,128 --lrs=1e-3,3e-3,1e-2 --seeds=0,1 \
        --workdir=runs/sweep_mqar [--config.train.steps=2000 ...]

Every cell of the grid is one :func:`experiments.train.train_and_evaluate` run in its own
sub-workdir ``<workdir>/cells/<mixer>-d<d_model>-lr<lr>-s<seed>``; the cell's config is the
``--config`` config (any field overridable as ``--config.a.b=v``) with ``model.mixer``
(``model.mixer_pattern`` cleared), ``model.d_model``, ``optim.lr``, ``train.seed`` (model init)
and ``task.seed`` (data stream) set.  A re-run skips every cell whose ``summary.json`` exists and
was written by the same config, so an interrupted sweep resumes where it stopped (the
interrupted cell resumes from its own checkpoint); a cell whose ``summary.json`` came from a
different config is an error (use a fresh ``--workdir``).  A cell that diverges (non-finite loss,
``FloatingPointError``) is recorded as ``diverged`` (``<cell>/diverged.json``) and not retried.
Unknown mixer names fail before any training, with the registry's message (closest match).

Outputs under ``--workdir``:

* ``results.csv`` — one row per run: mixer, d_model, lr, seed, status, final / best valid
  accuracy and loss, final train loss, params, wall time.
* ``results.md`` — per mixer × d_model, the best over the LR grid of the seed-mean *final* valid
  accuracy, ± the sample std over seeds, and the chosen LR (Zoology, arXiv:2312.04927, reports
  the best over its LR grid).  An LR point where any seed diverged is not eligible; ties go to
  the smaller LR.
* ``accuracy_vs_dmodel.png`` — that accuracy against d_model (log2 axis), one line per mixer.
* ``loss_curves.png`` — train and valid loss (seed mean) against step for the chosen LR of every
  mixer at the largest d_model, from the runs' ``metrics.jsonl``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from typing import Callable, Iterable, Sequence

import ml_collections
from absl import app, flags

from experiments.common.config import ConfigError, check_cli_overrides, validate

__all__ = ["Cell", "SweepError", "grid", "check_mixers", "cell_config", "run_cell", "run_sweep", "aggregate",
           "write_results", "parse_argv", "CSV_FIELDS"]

#: Columns of ``results.csv``, in order.
CSV_FIELDS = ("mixer", "d_model", "lr", "seed", "status", "steps", "final_valid_accuracy", "final_valid_loss",
              "best_valid_accuracy", "best_valid_loss", "final_train_loss", "params", "wall_time_sec", "workdir")

#: Config fields that do not change what a run computes (ignored when matching a finished cell).
_COSMETIC = (("train", "progress"),)


class SweepError(ValueError):
    """A bad sweep argument or an inconsistent sweep workdir; the message names the flag or cell."""


@dataclasses.dataclass(frozen=True)
class Cell:
    mixer: str
    d_model: int
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.mixer}-d{self.d_model}-lr{self.lr:g}-s{self.seed}"


def grid(mixers: Sequence[str], d_models: Sequence[int], lrs: Sequence[float], seeds: Sequence[int]) -> list[Cell]:
    """The cells in run order (mixer-major, so one mixer's results complete first)."""
    for flag, values in (("mixers", mixers), ("d_models", d_models), ("lrs", lrs), ("seeds", seeds)):
        if not values:
            raise SweepError(f"--{flag}: expected at least one value")
        if len(set(values)) != len(values):
            raise SweepError(f"--{flag}: duplicate values in {list(values)}")
    return [Cell(m, int(d), float(lr), int(s)) for m in mixers for d in d_models for lr in lrs for s in seeds]


def check_mixers(names: Iterable[str]) -> None:
    """Raise :class:`SweepError` with the registry's message (registered names, closest match)
    for the first unknown mixer name."""
    from attn_jax import mixers
    for name in names:
        try:
            mixers.get(name)
        except ValueError as e:
            raise SweepError(f"--mixers: {e}") from None


def cell_config(base: ml_collections.ConfigDict, cell: Cell) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(base.to_dict())
    c.model.mixer = cell.mixer
    c.model.mixer_pattern = None
    c.model.d_model = cell.d_model
    c.optim.lr = cell.lr
    c.train.seed = cell.seed
    c.task.seed = cell.seed
    return c


def _normalise(config_dict: dict) -> dict:
    d = json.loads(json.dumps(config_dict, sort_keys=True, default=str))
    for section, key in _COSMETIC:
        d.get(section, {}).pop(key, None)
    return d


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        path = f"{prefix}.{k}" if prefix else k
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _differences(a[k], b[k], path)
        elif a.get(k) != b.get(k):
            out.append(path)
    return out


def _row(cell: Cell, workdir: str, summary: dict | None, status: str) -> dict:
    row = {"mixer": cell.mixer, "d_model": cell.d_model, "lr": cell.lr, "seed": cell.seed, "status": status,
           "workdir": workdir}
    summary = summary or {}
    valid, train = summary.get("final_valid") or {}, summary.get("final_train") or {}
    nan = float("nan")
    row.update(steps=summary.get("steps", ""), final_valid_accuracy=valid.get("accuracy", nan),
               final_valid_loss=valid.get("loss", nan),
               best_valid_accuracy=_num(summary.get("best_valid_accuracy")),
               best_valid_loss=_num(summary.get("best_valid_loss")), final_train_loss=train.get("loss", nan),
               params=summary.get("param_count", ""), wall_time_sec=_num(summary.get("wall_time_sec")))
    return row


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def run_cell(config: ml_collections.ConfigDict, cell: Cell, workdir: str) -> tuple[dict, bool]:
    """Train one cell in ``workdir`` unless it already finished with this config;
    returns ``(row, trained)``."""
    from experiments.train import train_and_evaluate

    want = _normalise(config.to_dict())
    for done_file, status in (("summary.json", "ok"), ("diverged.json", "diverged")):
        path = os.path.join(workdir, done_file)
        if os.path.exists(path):
            with open(path) as f:
                done = json.load(f)
            diff = _differences(_normalise(done.get("config", {})), want)
            if diff:
                raise SweepError(f"cell {cell.name}: {path} was written by a different config (differs in "
                                 f"{', '.join(diff[:6])}); use a fresh --workdir or delete the cell")
            return _row(cell, workdir, done if status == "ok" else None, status), False
    try:
        summary = train_and_evaluate(config, workdir)
    except FloatingPointError as e:
        with open(os.path.join(workdir, "diverged.json"), "w") as f:
            json.dump({"error": str(e), "config": config.to_dict()}, f, indent=2)
        return _row(cell, workdir, None, "diverged"), True
    return _row(cell, workdir, summary, "ok"), True


def run_sweep(base: ml_collections.ConfigDict, mixers: Sequence[str], d_models: Sequence[int],
              lrs: Sequence[float], seeds: Sequence[int], workdir: str, *,
              log: Callable[[str], None] = print, plots: bool = True) -> dict:
    """Run (or resume) the grid and write the results; returns ``{"rows", "table", "trained",
    "skipped", "files"}`` (``trained`` / ``skipped``: cell names)."""
    cells = grid(mixers, d_models, lrs, seeds)
    check_mixers(mixers)                                   # before any training
    configs = [cell_config(base, c) for c in cells]
    for cell, config in zip(cells, configs):
        try:
            validate(config)
        except ConfigError as e:
            raise SweepError(f"cell {cell.name}: {e}") from None
    os.makedirs(workdir, exist_ok=True)
    rows, trained, skipped = [], [], []
    for i, (cell, config) in enumerate(zip(cells, configs), 1):
        t0 = time.perf_counter()
        row, did_train = run_cell(config, cell, os.path.join(workdir, "cells", cell.name))
        rows.append(row)
        (trained if did_train else skipped).append(cell.name)
        what = "trained" if did_train else "done earlier"
        if row["status"] == "ok":
            log(f"[{i}/{len(cells)}] {cell.name}: valid acc {row['final_valid_accuracy']:.3f} "
                f"loss {row['final_valid_loss']:.3f} params {row['params']} ({what}, {time.perf_counter() - t0:.1f} s)")
        else:
            log(f"[{i}/{len(cells)}] {cell.name}: {row['status']} ({what})")
        _write_csv(rows, os.path.join(workdir, "results.csv"))       # partial results while running
    out = write_results(rows, workdir, base, plots=plots)
    return {"rows": rows, "table": out["table"], "trained": trained, "skipped": skipped, "files": out["files"]}


# ----------------------------------------------------------------------------- aggregation
def aggregate(rows: Sequence[dict], metric: str = "final_valid_accuracy") -> list[dict]:
    """Per (mixer, d_model) in first-seen order: ``lr`` (chosen), ``mean``, ``std`` (sample std
    over seeds; 0 for one seed), ``n`` (seeds), ``params``, ``per_lr`` ({lr: seed-mean or None if
    any seed diverged}).  ``lr``/``mean``/``std`` are None when every LR point diverged."""
    groups: dict[tuple, dict[float, list[dict]]] = {}
    for r in rows:
        groups.setdefault((r["mixer"], int(r["d_model"])), {}).setdefault(float(r["lr"]), []).append(r)
    table = []
    for (mixer, d_model), by_lr in groups.items():
        per_lr, best = {}, None
        for lr in sorted(by_lr):
            runs = by_lr[lr]
            vals = [float(r[metric]) for r in runs]
            if any(r["status"] != "ok" for r in runs) or not all(math.isfinite(v) for v in vals):
                per_lr[lr] = None
                continue
            mean = sum(vals) / len(vals)
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            per_lr[lr] = mean
            if best is None or mean > best[1]:                # strict: ties keep the smaller LR
                best = (lr, mean, std, len(vals))
        params = next((r["params"] for runs in by_lr.values() for r in runs if r["params"] not in ("", None)), "")
        lr, mean, std, n = best if best else (None, None, None, 0)
        table.append({"mixer": mixer, "d_model": d_model, "lr": lr, "mean": mean, "std": std, "n": n,
                      "params": params, "per_lr": per_lr})
    return table


def _fmt(x, spec=".3f") -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _write_csv(rows: Sequence[dict], path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (repr(r[k]) if isinstance(r[k], float) and k == "lr" else r[k]) for k in CSV_FIELDS})
    os.replace(tmp, path)


def _markdown(table: Sequence[dict], rows: Sequence[dict], base: ml_collections.ConfigDict | None) -> str:
    mixers = list(dict.fromkeys(t["mixer"] for t in table))
    d_models = sorted({t["d_model"] for t in table})
    lrs = sorted({float(r["lr"]) for r in rows})
    seeds = sorted({int(r["seed"]) for r in rows})
    by = {(t["mixer"], t["d_model"]): t for t in table}
    lines = ["# Sweep results", ""]
    if base is not None:
        task = {k: v for k, v in base.task.to_dict().items() if k != "seed"}
        lines += [f"- task: `{json.dumps(task)}`",
                  f"- model: num_layers {base.model.num_layers}, num_heads {base.model.num_heads}, mlp {base.model.mlp}",
                  f"- train: {base.train.steps} steps, batch {base.train.batch_size}, "
                  f"eval {base.train.eval_batches} batches; optim {base.optim.schedule}, "
                  f"warmup {base.optim.warmup_steps}, weight decay {base.optim.weight_decay}"]
    lines += [f"- grid: lrs {', '.join(f'{x:g}' for x in lrs)}; seeds {', '.join(map(str, seeds))} "
              f"(seed = model init and data stream)",
              "- metric: final valid accuracy (query positions only); each cell is the best over the LR grid "
              "of the seed-mean, ± sample std over seeds, (chosen LR). An LR point where a seed diverged is "
              "not eligible.", ""]
    lines += ["| mixer | " + " | ".join(f"d_model {d}" for d in d_models) + " |",
              "|---|" + "---|" * len(d_models)]
    for m in mixers:
        cells = []
        for d in d_models:
            t = by.get((m, d))
            if t is None:
                cells.append("")
            elif t["mean"] is None:
                cells.append("diverged")
            else:
                cells.append(f"{t['mean']:.3f} ± {t['std']:.3f} (lr {t['lr']:g})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Per learning rate (seed-mean final valid accuracy; `div` = a seed diverged):", "",
              "| mixer | d_model | params | " + " | ".join(f"lr {x:g}" for x in lrs) + " |",
              "|---|---|---|" + "---|" * len(lrs)]
    for t in table:
        cells = ["" if lr not in t["per_lr"] else ("div" if t["per_lr"][lr] is None else f"{t['per_lr'][lr]:.3f}")
                 for lr in lrs]
        lines.append(f"| {t['mixer']} | {t['d_model']} | {t['params']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _curves(rows: Sequence[dict]) -> dict:
    """Seed-mean train and valid loss per step of ``rows`` (steps present in every run)."""
    from experiments.common.metrics import read_metrics
    out = {}
    for split in ("train", "valid"):
        per_run = []
        for r in rows:
            per_run.append({m["step"]: m["loss"] for m in read_metrics(r["workdir"]) if m["split"] == split})
        steps = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
        out[split] = (steps, [sum(p[s] for p in per_run) / len(per_run) for s in steps])
    return out


def write_results(rows: Sequence[dict], workdir: str, base: ml_collections.ConfigDict | None = None, *,
                  plots: bool = True) -> dict:
    """``results.csv``, ``results.md`` and (``plots``) the two PNGs; returns ``{"table", "files"}``."""
    table = aggregate(rows)
    files = {"csv": os.path.join(workdir, "results.csv"), "md": os.path.join(workdir, "results.md")}
    _write_csv(rows, files["csv"])
    with open(files["md"], "w") as f:
        f.write(_markdown(table, rows, base))
    if plots:
        from experiments.common import plots as P
        series: dict[str, list] = {}
        for t in table:
            series.setdefault(t["mixer"], []).append(
                (t["d_model"], float("nan") if t["mean"] is None else t["mean"], t["std"] or 0.0))
        files["accuracy_vs_dmodel"] = P.accuracy_vs_dmodel(
            series, os.path.join(workdir, "accuracy_vs_dmodel.png"),
            title="best over LR of the seed-mean final valid accuracy")
        d_max = max(int(r["d_model"]) for r in rows)
        curves = {}
        for t in table:
            if t["d_model"] == d_max and t["lr"] is not None:
                chosen = [r for r in rows if r["mixer"] == t["mixer"] and int(r["d_model"]) == d_max
                          and float(r["lr"]) == t["lr"]]
                curves[f"{t['mixer']} (lr {t['lr']:g})"] = _curves(chosen)
        files["loss_curves"] = P.loss_curves(curves, os.path.join(workdir, "loss_curves.png"),
                                             title=f"d_model {d_max}, chosen LR, seed mean")
    return {"table": table, "files": files}


# ----------------------------------------------------------------------------- command line
def _define_flags(fv: flags.FlagValues, sys_argv: list[str] | None = None):
    kw = {} if sys_argv is None else {"sys_argv": list(sys_argv)}
    from ml_collections import config_flags
    h = {
        "config": config_flags.DEFINE_config_file("config", None, "Base config file, path/to/cfg.py[:arg].",
                                                  flag_values=fv, lock_config=True, **kw),
        "mixers": flags.DEFINE_list("mixers", None, "Mixer names (attn_jax.mixers.names()).", flag_values=fv),
        "d_models": flags.DEFINE_list("d_models", None, "Model widths (default: the config's d_model).",
                                      flag_values=fv),
        "lrs": flags.DEFINE_list("lrs", None, "Learning rates (default: the config's optim.lr).", flag_values=fv),
        "seeds": flags.DEFINE_list("seeds", ["0"], "Seeds (model init and data stream).", flag_values=fv),
        "workdir": flags.DEFINE_string("workdir", None, "Sweep directory (cells/, results.*, plots).",
                                       flag_values=fv),
    }
    return h


def _parse_list(flag: str, values, kind):
    out = []
    for v in values or []:
        try:
            x = kind(v)
        except ValueError:
            raise SweepError(f"--{flag}: expected {kind.__name__} values, got {v!r}") from None
        if kind is not int or flag != "seeds":
            if not x > 0:
                raise SweepError(f"--{flag}: expected positive values, got {v!r}")
        out.append(x)
    return out


def _resolve(h) -> tuple[ml_collections.ConfigDict, dict, str]:
    config = h["config"].value
    if config is None:
        raise SweepError("--config: required (path/to/cfg.py[:arg])")
    if not h["workdir"].value:
        raise SweepError("--workdir: required")
    if not h["mixers"].value:
        raise SweepError("--mixers: required (comma-separated)")
    spec = dict(mixers=[m.strip() for m in h["mixers"].value],
                d_models=_parse_list("d_models", h["d_models"].value, int) or [int(config.model.d_model)],
                lrs=_parse_list("lrs", h["lrs"].value, float) or [float(config.optim.lr)],
                seeds=_parse_list("seeds", h["seeds"].value, int))
    return config, spec, h["workdir"].value


def parse_argv(argv: list[str]) -> tuple[ml_collections.ConfigDict, dict, str]:
    """Parse a command line (own FlagValues; for tests and wrappers): ``(config, grid_spec, workdir)``
    with ``grid_spec = {mixers, d_models, lrs, seeds}``."""
    check_cli_overrides(argv)
    fv = flags.FlagValues()
    h = _define_flags(fv, argv)
    fv(argv)
    return _resolve(h)


_HANDLES: dict = {}


def main(argv):
    from absl import logging
    logging.set_verbosity(logging.WARNING)             # orbax logs every checkpoint write at INFO
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        config, spec, workdir = _resolve(_HANDLES)
        result = run_sweep(config, workdir=workdir, **spec)
    except (SweepError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print()
    with open(result["files"]["md"]) as f:
        print(f.read())
    print("wrote " + ", ".join(result["files"].values()))


def _flags_parser(argv: list[str]) -> list[str]:
    try:
        check_cli_overrides(argv)
    except ConfigError as e:
        print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
        sys.exit(1)
    return app.parse_flags_with_usage(argv)


def cli():
    _HANDLES.update(_define_flags(flags.FLAGS))
    app.run(main, flags_parser=_flags_parser)


if __name__ == "__main__":
    cli()

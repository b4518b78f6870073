"""experiments.train / generate / evaluate on tiny self-contained tasks (one per task kind).

The tiny tasks are defined here (not in experiments/tasks) so these tests do not depend on the
real tasks; ``register_tiny_tasks()`` is also imported by the config files the reliability tests
write for their subprocess runs.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------- tiny tasks
@dataclasses.dataclass
class TinyCopy:
    """lm: ``seq_len // 2`` random tokens then the same tokens again; loss on the copy."""
    seed: int = 0
    vocab_size: int = 8
    seq_len: int = 16
    name: str = "tiny_copy"
    kind: str = "lm"

    def batch(self, split, index, batch_size):
        from experiments.tasks.base import rng_for
        rng = rng_for(self.seed, split, index)
        half = rng.integers(1, self.vocab_size, (batch_size, self.seq_len // 2 + 1))
        x = np.concatenate([half, half], axis=1)[:, : self.seq_len + 1]
        w = np.zeros((batch_size, self.seq_len), np.float32)
        w[:, self.seq_len // 2 + 1:] = 1.0
        return {"inputs": x[:, :-1].astype(np.int32), "targets": x[:, 1:].astype(np.int32), "weights": w}


@dataclasses.dataclass
class TinyRegress:
    seed: int = 0
    seq_len: int = 8
    input_dim: int = 3
    output_dim: int = 1
    name: str = "tiny_regress"
    kind: str = "regress"

    def batch(self, split, index, batch_size):
        from experiments.tasks.base import rng_for
        x = rng_for(self.seed, split, index).standard_normal((batch_size, self.seq_len, self.input_dim))
        y = np.cumsum(x.sum(-1, keepdims=True), axis=1) / np.arange(1, self.seq_len + 1)[:, None]
        return {"inputs": x.astype(np.float32), "targets": y.astype(np.float32),
                "weights": np.ones((batch_size, self.seq_len), np.float32)}


@dataclasses.dataclass
class TinyImage:
    seed: int = 0
    num_classes: int = 3
    image_shape: tuple = (4, 4, 1)
    seq_len: int = 0
    name: str = "tiny_image"
    kind: str = "image"

    def batch(self, split, index, batch_size):
        from experiments.tasks.base import rng_for
        rng = rng_for(self.seed, split, index)
        y = rng.integers(0, self.num_classes, batch_size)
        x = rng.standard_normal((batch_size, *self.image_shape)) * 0.5 + y[:, None, None, None]
        return {"inputs": x.astype(np.float32), "targets": y.astype(np.int32),
                "weights": np.ones(batch_size, np.float32)}


def register_tiny_tasks():
    from experiments.tasks import base
    for cls in (TinyCopy, TinyRegress, TinyImage):
        name = cls.__dataclass_fields__["name"].default
        if name not in base.names():
            base.register(name, cls)


def tiny_config(task="tiny_copy", steps=6):
    """A tiny config (d_model 16, 1 layer) for the tiny tasks."""
    from experiments.configs.base import with_task
    c = with_task(task, **({"vocab_size": 8, "seq_len": 16} if task == "tiny_copy" else {}))
    c.model.update(d_model=16, num_layers=1, num_heads=2)
    c.model.mixer_kwargs = {"softmax": {"impl": "reference"}}   # fastest to compile
    c.optim.update(lr=1e-2, warmup_steps=2)
    c.train.update(steps=steps, batch_size=4, eval_every=3, eval_batches=2, log_every=2, checkpoint_every=3,
                   keep_checkpoints=3, progress=False)
    return c


CONFIG_FILE = f'''
import importlib.util, sys
sys.path.insert(0, {REPO!r})
_spec = importlib.util.spec_from_file_location("_tiny_tasks", {os.path.abspath(__file__)!r})
_m = sys.modules["_tiny_tasks"] = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(_m)
_m.register_tiny_tasks()

def get_config(arg="tiny_copy"):
    return _m.tiny_config(arg)
'''


def write_config_file(tmp_path) -> str:
    path = tmp_path / "tiny_cfg.py"
    path.write_text(CONFIG_FILE)
    return str(path)


def subprocess_env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}


register_tiny_tasks()


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("task", ["tiny_copy", "tiny_regress", "tiny_image"])
def test_each_kind_writes_metrics_tb_summary(task, tmp_path):
    from experiments.common.metrics import deterministic, read_metrics
    from experiments.train import train_and_evaluate
    config = tiny_config(task)
    if task == "tiny_image":    # also: dropout (RNG state in the train state), bf16 compute, z-loss
        config.model.dropout_rate, config.train.bf16, config.optim.z_loss = 0.1, True, 1e-4
    summary = train_and_evaluate(config, str(tmp_path / "a"))
    lines = read_metrics(str(tmp_path / "a"))
    assert [(m["step"], m["split"]) for m in lines] == [(2, "train"), (3, "valid"), (4, "train"),
                                                          (6, "train"), (6, "valid")]
    assert all(np.isfinite(m["loss"]) for m in lines)
    assert ("accuracy" in lines[-1]) == (task != "tiny_regress")
    assert {"tokens_per_sec", "lr", "grad_norm"} <= set(lines[0])
    assert os.listdir(tmp_path / "a" / "tb")
    on_disk = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert on_disk["steps"] == summary["steps"] == 6 and on_disk["param_count"] > 0
    assert deterministic(on_disk["final_valid"]) == deterministic(lines[-1])
    assert json.loads((tmp_path / "a" / "config.json").read_text())["task"]["name"] == task
    if task == "tiny_copy":   # same seed -> identical metrics (a second run in another workdir)
        train_and_evaluate(tiny_config(task), str(tmp_path / "b"))
        assert [deterministic(m) for m in read_metrics(str(tmp_path / "b"))] == [deterministic(m) for m in lines]
        other = tiny_config(task)
        other.train.seed = 1
        train_and_evaluate(other, str(tmp_path / "c"))
        assert read_metrics(str(tmp_path / "c"))[0]["loss"] != lines[0]["loss"]


def test_cli_override_syntax(tmp_path):
    from experiments.train import config_from_argv
    cfg_file = write_config_file(tmp_path)
    config, workdir = config_from_argv(["train", f"--config={cfg_file}:tiny_regress", f"--workdir={tmp_path}",
                                        "--config.train.steps=7", "--config.model.mixer_pattern=softmax",
                                        "--config.optim.lr=0.5", "--config.train.bf16=True",
                                        "--config.model.mixer_kwargs.sliding_window.window=16",
                                        "--config.model.mixer_kwargs.softmax.positional=alibi"])
    assert (config.task.name, config.train.steps, config.model.mixer_pattern, config.optim.lr, config.train.bf16) == \
        ("tiny_regress", 7, "softmax", 0.5, True)
    assert config.model.mixer_kwargs.to_dict() == {"softmax": {"impl": "reference", "positional": "alibi"},
                                                   "sliding_window": {"window": 16}}
    assert workdir == str(tmp_path)
    from experiments.common.config import ConfigError
    with pytest.raises(ConfigError, match=r"config\.model\.mixer_kwargs: unknown mixer 'slidingwindow'.*"
                                          r"did you mean 'sliding_window'\?"):
        config_from_argv(["train", f"--config={cfg_file}", "--config.model.mixer_kwargs.slidingwindow.window=3"])


def test_generate_and_evaluate_on_a_trained_workdir(tmp_path):
    from experiments import evaluate, generate
    from experiments.train import train_and_evaluate
    work = str(tmp_path / "run")
    train_and_evaluate(tiny_config("tiny_copy"), work)
    text = generate.run(work, max_new_tokens=5, temperature=0.8, top_k=4, rows=2)
    assert "continuation" in text and "target" in text and "[step 6]" in text
    ev = evaluate.run(work, batches=2, output=str(tmp_path / "eval.json"))
    assert json.loads((tmp_path / "eval.json").read_text()) == ev
    assert not os.path.exists(os.path.join(work, "eval.json"))          # readers never write the workdir
    assert ev["step"] == 6 and ev["batches"] == 2 and np.isfinite(ev["loss"]) and 0 <= ev["accuracy"] <= 1
    # Same weights and batches as the run's last evaluation.
    last_valid = json.loads((tmp_path / "run" / "summary.json").read_text())["final_valid"]
    assert ev["loss"] == pytest.approx(last_valid["loss"], rel=1e-6)


def test_every_config_file_builds_its_task_and_model():
    import glob
    from flax import nnx
    from experiments.common.config import load_config_file, make_task, validate
    from experiments.common.models import build_model, param_count
    files = sorted(f for f in glob.glob(os.path.join(REPO, "experiments", "configs", "*.py"))
                   if not f.endswith(("base.py", "__init__.py")))
    assert len(files) == 9
    for f in files + [os.path.join(REPO, "experiments", "configs", "mqar.py:128x8")]:
        config = load_config_file(f)
        validate(config)
        task = make_task(config.task)
        model = nnx.eval_shape(lambda: build_model(config, task, rngs=nnx.Rngs(0)))
        assert param_count(model) > 0 and task.kind in ("lm", "regress", "image"), f
    assert (config.task.seq_len, config.task.num_kv_pairs) == (128, 8)

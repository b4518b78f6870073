"""The config schema every experiment config specialises (``get_base_config``).

Sections: ``task`` (name, seed and the task constructor's kwargs), ``model``, ``optim``,
``train``.  Any field is overridable on the command line as ``--config.a.b=v``; unknown keys
are errors listing the valid keys (``experiments.common.config``).
"""

import ml_collections
from ml_collections import config_dict


def get_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = ml_collections.ConfigDict({"name": "", "seed": 0})   # + the task's constructor kwargs
    c.model = ml_collections.ConfigDict(dict(
        mixer="softmax",                                  # the mixer of every layer (attn_jax.mixers.names())
        mixer_pattern=config_dict.placeholder(str),       # e.g. "gla,softmax"; overrides mixer when set
        d_model=64, num_layers=2, num_heads=4,
        num_kv_heads=config_dict.placeholder(int),        # GQA; default = num_heads
        mixer_kwargs={},                                  # mixer name -> kwargs of its factory
        mlp="swiglu",                                     # "swiglu" | "gelu"
        dropout_rate=0.0,
        patch_size=2,                                     # ViT ("image" tasks) only
    ))
    c.optim = ml_collections.ConfigDict(dict(
        lr=3e-3, warmup_steps=50, weight_decay=0.01, b1=0.9, b2=0.98, clip_norm=1.0,
        z_loss=0.0,                                       # z_loss * mean(logsumexp(logits)^2), lm / image
        schedule="cosine",                                # "cosine": linear warmup then cosine decay to 0; "constant": linear warmup then constant
    ))
    c.train = ml_collections.ConfigDict(dict(
        steps=500, batch_size=32, seed=0,
        eval_every=100, eval_batches=4, log_every=25,
        checkpoint_every=100, keep_checkpoints=2,
        bf16=False,                                       # bf16 compute, fp32 params and optimizer state
        progress=True,                                    # tqdm progress bar on stderr
        debug_nan_at_step=-1,                             # tests only: make the loss of this step NaN
    ))
    return c


def with_task(name: str, **task_kwargs) -> ml_collections.ConfigDict:
    """The base config with ``task = {name, seed=0, **task_kwargs}``."""
    c = get_base_config()
    # None-valued (optional int) task fields become typed placeholders so --config.task.x=3 works.
    kw = {k: config_dict.placeholder(int) if v is None else v for k, v in task_kwargs.items()}
    c.task = ml_collections.ConfigDict({"name": name, "seed": 0, **kw})
    return c


def no_arg(name: str, arg) -> None:
    if arg:
        raise ValueError(f"config: {name}.py takes no argument, got {arg!r}")

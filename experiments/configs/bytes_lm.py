"""Byte-level language modelling on the offline corpus of experiments/tasks/bytes_lm.py.

Then: ``python -m experiments.generate --workdir=<workdir> --prompt="def "``.
"""

from experiments.configs.base import no_arg, with_task


def get_config(arg=None):
    no_arg("bytes_lm", arg)
    c = with_task("bytes_lm", seq_len=128, valid_fraction=0.05, max_bytes=None)
    c.model.update(d_model=128, num_layers=2, num_heads=4)
    c.optim.update(lr=3e-3, warmup_steps=100, weight_decay=0.1)
    c.train.update(steps=2000, batch_size=32, eval_every=250, eval_batches=8, log_every=50, checkpoint_every=500)
    return c

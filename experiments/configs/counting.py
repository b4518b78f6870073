"""Counting occurrences of symbols in a sequence (a synthetic counting task)."""

from experiments.configs.base import no_arg, with_task


def get_config(arg=None):
    no_arg("counting", arg)
    c = with_task("counting", seq_len=64, num_symbols=8, num_vars=1)
    c.model.update(d_model=64, num_layers=2, num_heads=4)
    c.optim.update(lr=3e-3, warmup_steps=100)
    c.train.update(steps=1000, batch_size=32, eval_every=200, log_every=50, checkpoint_every=250)
    return c

"""Flip-flop language modelling (Liu et al., 2023, arXiv:2306.00946), shortened for CPU."""

from experiments.configs.base import no_arg, with_task


def get_config(arg=None):
    no_arg("flip_flop", arg)
    c = with_task("flip_flop", seq_len=128, p_write=0.1, p_ignore=0.8, p_read=0.1, final_read=True)
    c.model.update(d_model=64, num_layers=2, num_heads=4)
    c.optim.update(lr=3e-3, warmup_steps=100)
    c.train.update(steps=1000, batch_size=32, eval_every=200, eval_batches=8, log_every=50, checkpoint_every=250)
    return c

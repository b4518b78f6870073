"""Selective copying (Mamba: Gu & Dao, 2023, arXiv:2312.00752), shortened for CPU."""

from experiments.configs.base import no_arg, with_task


def get_config(arg=None):
    no_arg("selective_copy", arg)
    c = with_task("selective_copy", vocab_size=16, seq_len=128, num_tokens_to_copy=8)
    c.model.update(d_model=64, num_layers=2, num_heads=4)
    c.optim.update(lr=3e-3, warmup_steps=100)
    c.train.update(steps=2000, batch_size=32, eval_every=250, log_every=50, checkpoint_every=500)
    return c

"""Induction heads (Olsson et al., 2022; the H3 / Mamba synthetic version)."""

from experiments.configs.base import no_arg, with_task


def get_config(arg=None):
    no_arg("induction_heads", arg)
    c = with_task("induction_heads", vocab_size=16, seq_len=128)
    c.model.update(d_model=64, num_layers=2, num_heads=4)
    c.optim.update(lr=3e-3, warmup_steps=100)
    c.train.update(steps=1000, batch_size=32, eval_every=200, log_every=50, checkpoint_every=250)
    return c

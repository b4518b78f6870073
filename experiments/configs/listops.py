"""ListOps (Nangia & Bowman, 2018; Long Range Arena), CPU-sized expressions."""

from experiments.configs.base import no_arg, with_task


def get_config(arg=None):
    no_arg("listops", arg)
    c = with_task("listops", seq_len=128, max_depth=5, max_args=5, min_length=16, max_length=None)
    c.model.update(d_model=64, num_layers=2, num_heads=4)
    c.optim.update(lr=1e-3, warmup_steps=200)
    c.train.update(steps=2000, batch_size=32, eval_every=250, eval_batches=8, log_every=50, checkpoint_every=500)
    return c

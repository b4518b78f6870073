"""In-context linear regression (Garg et al., 2022, arXiv:2208.01066), small."""

from experiments.configs.base import no_arg, with_task


def get_config(arg=None):
    no_arg("icl_regression", arg)
    c = with_task("icl_regression", dim=5, num_points=20, noise_std=0.0)
    c.model.update(d_model=64, num_layers=2, num_heads=4, mlp="gelu")
    c.optim.update(lr=1e-3, warmup_steps=200, weight_decay=0.0)
    c.train.update(steps=3000, batch_size=64, eval_every=500, eval_batches=8, log_every=100, checkpoint_every=500)
    return c

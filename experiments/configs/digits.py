"""scikit-learn's 8x8 digits with a small ViT (2x2 patches: 16 tokens + CLS)."""

from experiments.configs.base import no_arg, with_task


def get_config(arg=None):
    no_arg("digits", arg)
    c = with_task("digits", valid_fraction=0.2)
    c.model.update(d_model=64, num_layers=2, num_heads=4, patch_size=2, mlp="gelu")
    c.optim.update(lr=1e-3, warmup_steps=50, weight_decay=0.05)
    c.train.update(steps=600, batch_size=64, eval_every=100, eval_batches=6, log_every=25, checkpoint_every=200)
    return c

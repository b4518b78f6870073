"""MQAR (multi-query associative recall, Zoology: Arora et al., 2023, arXiv:2312.04927).

``--config=experiments/configs/mqar.py:<seq_len>x<num_kv_pairs>``, e.g. ``:64x4`` (default),
``:128x8``, ``:256x16``.  ``--config.task.random_non_queries=False`` puts token 0 instead of random
tokens between the queries (Zoology's default is random fillers).
"""

from experiments.configs.base import with_task

#: The ``:arg`` of ``--config=experiments/configs/mqar.py:<arg>`` (optional; default ``64x4``).
ARG = "<seq_len>x<num_kv_pairs>, e.g. :64x4 (the default) or :128x8"


def get_config(arg=None):
    parts = (arg or "64x4").lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"config: mqar.py takes <seq_len>x<num_kv_pairs> (two positive ints), got {arg!r}")
    seq_len, pairs = (int(p) for p in parts)
    c = with_task("mqar", vocab_size=8192, seq_len=seq_len, num_kv_pairs=pairs, power_a=0.01,
                  random_non_queries=True)
    c.model.update(d_model=64, num_layers=2, num_heads=2)
    c.optim.update(lr=3e-3, warmup_steps=100, weight_decay=0.1)
    c.train.update(steps=2000, batch_size=64, eval_every=250, eval_batches=4, log_every=50, checkpoint_every=500)
    return c

"""Shared pieces of the experiment scripts (train / generate / evaluate), one job per module:

* :mod:`.config`     -- config schema checks, CLI override checks, ``did you mean`` hints
* :mod:`.models`     -- the model of a (config, task) pair and its forward function
* :mod:`.losses`     -- loss and metric sums per task kind ("lm", "regress", "image")
* :mod:`.optim`      -- AdamW with linear warmup + cosine decay and global-norm clipping
* :mod:`.checkpoint` -- orbax CheckpointManager with validated resume and fallback
* :mod:`.metrics`    -- metrics.jsonl + TensorBoard writers (resume-safe)
* :mod:`.progress`   -- the tqdm progress bar
"""

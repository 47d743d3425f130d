"""A one-hour run on one GPU: Wikipedia and Shakespeare, scored on held-out text and on the KJV.

    just pipeline configs/gpu_1h.py

The planner measures the GPU and picks the model and batch for the hour (longer context, bigger
vocabulary than the CPU demo). The King James Bible is not trained on: its bits per byte show
how the model does on English it has not seen the like of.
"""

from pufferfish_jax.config import defaults


def get_config():
    cfg = defaults()
    cfg.budget.time = "1h"
    cfg.data.corpus = "wiki,shakespeare"
    cfg.data.vocab_size = 16384
    cfg.model.seq_len = 512
    cfg.train.checkpoint_every_s = 600.0
    cfg.eval.sets = "val,kjv"
    cfg.eval.max_chars = 0
    cfg.sample.prompts = "The history of|ROMEO:|The theory of relativity"
    cfg.sample.max_new_tokens = 200
    cfg.sample.min_new_tokens = 100
    return cfg

"""TinyStories (Eldan and Li, 2023) from the Hugging Face hub: needs `pip install datasets` and a
network; offline, the pipeline stops at the corpus stage with a one-line message.

    just pipeline configs/tinystories.py

A tenth of the training split (about 190 M characters) and the whole validation split; a small
vocabulary suits the stories' simple words. One hour, on whatever device is present.
"""

from pufferfish_jax.config import defaults


def get_config():
    cfg = defaults()
    cfg.budget.time = "1h"
    cfg.data.corpus = "hf:roneneldan/TinyStories:train[:10%]"
    cfg.data.val_source = "hf:roneneldan/TinyStories:validation"
    cfg.data.vocab_size = 4096
    cfg.model.seq_len = 256
    cfg.eval.sets = "val"
    cfg.sample.prompts = "Once upon a time|The little dog|Lily and Tom went to the park"
    cfg.sample.max_new_tokens = 150
    cfg.sample.min_new_tokens = 80
    return cfg

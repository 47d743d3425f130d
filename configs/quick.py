"""A 2-minute CPU demo: a small slice of Shakespeare, a 2k-token vocabulary, a tiny model.

    just train config=configs/quick.py
"""

from pufferfish_jax.config import defaults


def get_config():
    cfg = defaults()
    cfg.budget.time = "2m"
    cfg.data.corpus = "shakespeare"
    cfg.data.vocab_size = 2048
    cfg.data.max_chars = 1_000_000
    cfg.model.seq_len = 128
    return cfg

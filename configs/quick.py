"""A 2-minute CPU demo: a small slice of Shakespeare, a 2k-token vocabulary, a tiny model.

    just train config=configs/quick.py
    just pipeline configs/quick.py     # the same training, then evals on three texts, samples, a report

The 2-minute budget covers the pipeline from its start to the end of training; evaluation,
sampling and the report come after it (about 20 s here).
"""

from pufferfish_jax.config import defaults


def get_config():
    cfg = defaults()
    cfg.budget.time = "2m"
    cfg.data.corpus = "shakespeare"
    cfg.data.vocab_size = 2048
    cfg.data.max_chars = 1_000_000
    cfg.model.seq_len = 128
    # Pipeline: the held-out scenes, plus two other built-in texts (200k characters each).
    cfg.eval.sets = "val,kjv,wiki"
    cfg.eval.max_chars = 200_000
    cfg.sample.prompts = "ROMEO:|To be, or not to be|The king hath"
    cfg.sample.max_new_tokens = 80
    cfg.sample.min_new_tokens = 40
    return cfg

"""The default run: the built-in `wiki` corpus, model and steps chosen by the planner for the budget.

    just train budget=1h config=configs/default.py
    just pipeline configs/default.py budget=1h    # then evaluate on the held-out split, sample, report
"""

from pufferfish_jax.config import defaults


def get_config():
    return defaults()

"""The default run: the built-in `wiki` corpus, model and steps chosen by the planner for the budget.

    just train budget=1h config=configs/default.py
"""

from pufferfish_jax.config import defaults


def get_config():
    return defaults()

"""The score the planner ranks candidates by: a Chinchilla-form loss L(N, D) with the data
discounted for repeated epochs and for batches far from the critical batch.

Only comparisons between candidates mean anything: the constants were fitted on far larger
models (Hoffmann et al. 2022), and the two discounts on 2-minute CPU runs (wiki; Shakespeare for
Muon's critical batch, so that no constant is fitted on the runs docs/recipe.md reports).
"""

from __future__ import annotations

import math

CHINCHILLA = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
REPEAT_HALF_LIFE = 15.4  # Muennighoff et al.: R*, the repetitions over which extra epochs fade
# McCandlish et al. 2018: reaching a loss takes E = E_min (1 + B / B_crit) tokens at batch B, so
# tokens beyond the critical batch buy less. B_crit grows with the data a run sees (roughly as its
# square root, Zhang et al. 2024). Per optimizer: AdamW's is fitted to 2-minute CPU runs on the
# wiki corpus, about 1M tokens, where 2k-token batches beat 4k-token ones by 0.22 bpb at equal time;
# Muon's, on 2-minute runs of the Shakespeare corpus (2 seeds, 1.5-1.8M tokens), where 2k- and
# 4k-token batches beat 1k by 1.9 % at equal time, is twice that (docs/recipe.md).
CRITICAL_BATCH_TOKENS_AT_1M = {"adamw": 2048, "muon": 4096}


def effective_tokens(tokens: float, unique_tokens: float) -> float:
    """Tokens discounted for repetition: epochs past the first fade with half-life R*."""
    if tokens <= unique_tokens:
        return tokens
    repeats = tokens / unique_tokens - 1
    return unique_tokens * (1 + REPEAT_HALF_LIFE * (1 - math.exp(-repeats / REPEAT_HALF_LIFE)))


def batch_efficiency(tokens_per_step: float, tokens: float, optimizer: str) -> float:
    """The fraction of a run's tokens that count, as a function of its batch.

    Above the critical batch B_c, tokens are wasted (McCandlish et al.: E = E_min (1 + B/B_c)).
    Far below it, gradient noise at a fixed learning rate costs more than the extra steps win: the
    c / x term, with c = 1/4 putting the optimum at B_c / 2. Fitted for AdamW at ~1M tokens: batches
    of 512, 1024, 2048 and 4096 tokens scored 1.90, 1.87, 1.88 and 2.11 bpb in equal time.
    """
    x = tokens_per_step / (CRITICAL_BATCH_TOKENS_AT_1M[optimizer] * math.sqrt(max(tokens, 1.0) / 1e6))
    return 1 / (1 + x + 0.25 / x)


def predicted_loss(params: float, effective_tokens_: float) -> float:
    c = CHINCHILLA
    return c["E"] + c["A"] / params ** c["alpha"] + c["B"] / max(effective_tokens_, 1.0) ** c["beta"]

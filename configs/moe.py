"""Mixture of experts with auxiliary-loss-free balancing (DeepSeek-V3): the planner still chooses
the shape and steps for the budget; every block's FFN becomes 8 routed experts (top-2) plus one
shared expert, each a third of the dense FFN's width, so a token's active parameters stay close
to the dense model's while the total grows about 3x.

    just train budget=5m config=configs/moe.py

A capacity of 1.25x an even share keeps the dispatch a sort and gather into fixed-size expert
buffers (about 1.2x the dense FFN's work; dropless would run all 8 experts densely on a CPU). The
loss-free bias keeps the loads near even, so few tokens overflow: `moe.{i}.dropped` in
metrics.jsonl says how many.
"""

from pufferfish_jax.config import defaults


def get_config():
    cfg = defaults()
    cfg.moe.num_experts = 8
    cfg.moe.top_k = 2
    cfg.moe.num_shared_experts = 1
    cfg.moe.layers = "all"
    cfg.moe.score = "sigmoid"
    cfg.moe.balance = "loss_free"
    cfg.moe.bias_update_rate = 0.01
    cfg.moe.capacity_factor = 1.25
    return cfg

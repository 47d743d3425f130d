"""The PyTorch baseline of tools/bench_train.py: our Llama written in PyTorch, trained as its users
train it (eager with `foreach` AdamW, or `torch.compile`), in float32 or in our bfloat16 policy.

The dtype policy is ours on both sides. float32: everything float32. bfloat16: float32 master
parameters and optimizer state; the embedding output is cast to bfloat16, so the residual stream
is bfloat16 (as ours; plain autocast would keep it float32); every matmul (projections, attention,
LM head) takes bfloat16 inputs under `torch.autocast` (oneDNN accumulates in float32); RMSNorm
statistics, RoPE and the cross-entropy are float32. One difference remains: torch rounds the LM
head's logits to bfloat16 before the float32 loss, ours keeps the float32 accumulator.

torch is a benchmark-only dependency (requirements-dev.txt); nothing in the package imports it.
"""

from __future__ import annotations

import os
import time

import numpy as np


def torch_llama_class():
    import torch
    from torch import nn

    class RMSNorm(nn.Module):
        def __init__(self, d, eps):
            super().__init__()
            self.scale, self.eps = nn.Parameter(torch.ones(d)), eps

        def forward(self, x):
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale).to(x.dtype)

    def rope(x, sin, cos):
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    class Block(nn.Module):
        def __init__(self, s):
            super().__init__()
            self.s = s
            D, N, K, H, F = s.d_model, s.num_heads, s.num_kv_heads, s.head_dim, s.ffn_hidden
            self.attn_norm, self.mlp_norm = RMSNorm(D, s.norm_eps), RMSNorm(D, s.norm_eps)
            self.w_q, self.w_k, self.w_v = nn.Linear(D, N * H, False), nn.Linear(D, K * H, False), nn.Linear(D, K * H, False)
            self.w_o = nn.Linear(N * H, D, False)
            self.w_gate, self.w_up, self.w_down = nn.Linear(D, F, False), nn.Linear(D, F, False), nn.Linear(F, D, False)

        def forward(self, x, sin, cos):
            s = self.s
            B, T, _ = x.shape
            h = self.attn_norm(x)
            q = rope(self.w_q(h).view(B, T, s.num_heads, s.head_dim), sin, cos).transpose(1, 2)
            k = rope(self.w_k(h).view(B, T, s.num_kv_heads, s.head_dim), sin, cos).transpose(1, 2)
            v = self.w_v(h).view(B, T, s.num_kv_heads, s.head_dim).transpose(1, 2)
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + self.w_o(o.transpose(1, 2).reshape(B, T, -1)).to(x.dtype)
            h = self.mlp_norm(x)
            return x + self.w_down(torch.nn.functional.silu(self.w_gate(h)) * self.w_up(h)).to(x.dtype)

    class Llama(nn.Module):
        def __init__(self, s, compute_dtype):
            super().__init__()
            from pufferfish_jax.model.layers import rope_table

            self.s, self.compute_dtype = s, compute_dtype
            self.embed = nn.Embedding(s.vocab_size, s.d_model)
            self.blocks = nn.ModuleList(Block(s) for _ in range(s.num_layers))
            self.final_norm = RMSNorm(s.d_model, s.norm_eps)
            sin, cos = rope_table(s.seq_len, s.head_dim, s.rope_theta)
            self.register_buffer("sin", torch.from_numpy(sin)[:, None, :], persistent=False)  # [T, 1, R]
            self.register_buffer("cos", torch.from_numpy(cos)[:, None, :], persistent=False)

        def forward(self, tokens):
            T = tokens.shape[1]
            x = self.embed(tokens).to(self.compute_dtype)  # the residual stream in the compute dtype, as ours
            for block in self.blocks:
                x = block(x, self.sin[:T], self.cos[:T])
            return self.final_norm(x) @ self.embed.weight.T  # bf16 inputs under autocast

        @torch.no_grad()
        def load_ours(self, flat: dict):
            """Copies our parameter tree (flattened 'block_0/attn/w_q' keys) into this module."""
            s = self.s
            self.embed.weight.copy_(torch.from_numpy(flat["embed/embedding"]))
            self.final_norm.scale.copy_(torch.from_numpy(flat["final_norm/scale"]))
            for i, b in enumerate(self.blocks):
                get = lambda k: torch.from_numpy(flat[f"block_{i}/{k}"])  # noqa: E731
                b.attn_norm.scale.copy_(get("attn_norm/scale"))
                b.mlp_norm.scale.copy_(get("mlp_norm/scale"))
                for name in ("w_q", "w_k", "w_v"):
                    getattr(b, name).weight.copy_(get(f"attn/{name}").reshape(s.d_model, -1).T)
                b.w_o.weight.copy_(get("attn/w_o").reshape(-1, s.d_model).T)
                for name in ("w_gate", "w_up", "w_down"):
                    getattr(b, name).weight.copy_(get(f"mlp/{name}").T)

    return Llama


def make_trainer(spec, train_cfg, flat_params: dict, dtype: str, compiled: bool, lr: float):
    """(model, step(window) -> loss tensor): AdamW with `foreach` (our decay mask, betas, eps, clip)
    on our initial parameters; with `compiled`, the forward and loss go through `torch.compile`
    (the backward with them, through AOTAutograd), the optimizer stays eager."""
    import torch

    torch.manual_seed(0)
    compute = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    model = torch_llama_class()(spec, compute)
    model.load_ours(flat_params)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": train_cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(train_cfg.beta1, train_cfg.beta2), eps=1e-8, foreach=True)

    def forward_loss(inputs, targets):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute == torch.bfloat16):
            logits = model(inputs)
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    loss_of = torch.compile(forward_loss) if compiled else forward_loss

    def step(window: np.ndarray):
        window = torch.from_numpy(window).long()
        loss = loss_of(window[:, :-1], window[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if train_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip, foreach=True)
        opt.step()
        return loss.detach()

    return model, step


def run(spec, train_cfg, flat_params: dict, data: np.ndarray, *, dtype: str, compiled: bool, warmup: int,
        lr: float) -> dict:
    """Trains on data[i] for every i; the clock covers the steps after the first `warmup` (the
    first of which compiles, with `compiled`: that is `compile_s`, the time past a plain step)."""
    import torch

    model, step = make_trainer(spec, train_cfg, flat_params, dtype, compiled, lr)
    started = time.perf_counter()
    losses = [step(data[0])]
    first_s = time.perf_counter() - started
    losses += [step(data[i]) for i in range(1, warmup)]
    start = time.perf_counter()
    losses += [step(data[i]) for i in range(warmup, len(data))]
    seconds = time.perf_counter() - start
    per_step = seconds / max(len(data) - warmup, 1)
    return {"seconds": seconds, "compile_s": max(first_s - per_step, 0.0) if compiled else 0.0,
            "losses": [float(x) for x in losses], "params": sum(p.numel() for p in model.parameters()),
            "threads": torch.get_num_threads(), "cpus": os.cpu_count()}

#!/usr/bin/env python
"""Training speed: our jitted train step against the same Llama in plain PyTorch eager, one run.

    python tools/bench_train.py [--shapes 4x128x64x12,4x256x256x16,6x384x256x16] [--vocab 8192]
                                [--steps 10] [--warmup 2] [--repeats 3] [--ours-dtype bfloat16]

A shape is layers x d_model x seq_len x batch; heads come from the planner's ladder (head width 32
below d 384, 64 from there). Ours is the path `just train` runs: ModelSpec from the default config,
make_optimizer, init_state, make_train_step (AdamW, grad clip, weight-decay mask, donated state).
The baseline is the same architecture written in PyTorch eager (RMSNorm, half-split RoPE, SwiGLU,
GQA through scaled_dot_product_attention, tied embedding, AdamW with the same mask and clip),
started from *our* initial parameters and fed the same batches, so after N steps the losses must
agree (checked) and the speed is not bought with different math. PyTorch runs in float32 and
under bfloat16 autocast; the ratio is ours / the faster of the two.

Every (framework, shape) runs in its own subprocess, so peak RSS and thread pools never mix, and
repeats interleave (ours, torch fp32, torch bf16, ours, ...) so machine noise hits all alike;
`--repeats 3` reports medians. MFU = achieved FLOP/s (the model's FLOPs per token, the same
count for both) over the highest matmul rate measured in the same run (a probe
at the start of each repeat), in the precision
each side computes in. Ours' compile time is a cold XLA compile (the persistent cache is off here),
and ours runs under the allocator setting `python -m pufferfish_jax` gives itself (host_memory:
glibc.malloc.hugetlb=1); PyTorch runs as its users run it (the setting does not speed it up).
torch is a benchmark-only dependency (`pip install torch`); nothing else in the project needs it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_SHAPES = "4x128x64x12,4x256x256x16,6x384x256x16"
LR = 1e-3


def parse_shape(text: str) -> tuple[int, int, int, int]:
    layers, d_model, seq_len, batch = (int(x) for x in text.lower().split("x"))
    return layers, d_model, seq_len, batch


def model_spec(shape: tuple[int, int, int, int], vocab: int, dtype: str):
    """Our ModelSpec for a bench shape: the default config with the ladder's heads for (layers, d)."""
    from pufferfish_jax import config as config_lib
    from pufferfish_jax.budget.planner import LADDER, spec_for

    layers, d_model, seq_len, _ = shape
    heads = next(((n, k) for l, d, n, k in LADDER if (l, d) == (layers, d_model)), None)
    if heads is None:
        n = max(1, d_model // (32 if d_model < 384 else 64))
        heads = (n, max(1, n // 2) if n % 2 == 0 else n)
    cfg = config_lib.defaults()
    cfg.model.vocab_size, cfg.model.seq_len, cfg.model.dtype = vocab, seq_len, dtype
    return spec_for(cfg, (layers, d_model, *heads)), cfg.train


def batches(shape, vocab: int, count: int, seed: int = 0) -> np.ndarray:
    """[count, B, T+1] int32 windows of a learnable synthetic language: each token follows its
    predecessor through a fixed random map 3 times in 4, else a Zipf-distributed token."""
    _, _, seq_len, batch = shape
    rng = np.random.default_rng(seed)
    follow = rng.permutation(vocab)
    zipf = 1.0 / np.arange(1, vocab + 1)
    zipf /= zipf.sum()
    out = np.empty((count, batch, seq_len + 1), np.int32)
    out[:, :, 0] = rng.integers(0, vocab, (count, batch))
    fresh = rng.choice(vocab, size=(count, batch, seq_len), p=zipf)
    keep = rng.random((count, batch, seq_len)) < 0.75
    for t in range(seq_len):
        out[:, :, t + 1] = np.where(keep[:, :, t], follow[out[:, :, t]], fresh[:, :, t])
    return out


# ----------------------------------------------------------------------------------------- workers


def worker_peak(args) -> dict:
    """The probe `just hardware` and the training dashboard use (hardware.matmul_rate, same
    sizes and time), so the peaks here are theirs."""
    from pufferfish_jax.budget.hardware import matmul_rate

    return {"fp32": matmul_rate("float32"), "bf16": matmul_rate("bfloat16")}


def describe_cpu() -> str:
    """The host CPU's model and the SIMD features that set matmul speed (bf16 is emulated, slower
    than fp32, without AVX512_BF16 or ARM bf16), so results from different CPUs are not mixed up."""
    from pufferfish_jax.budget.hardware import cpu_info

    return cpu_info().describe()


def worker_ours(args) -> dict:
    import jax
    import jax.numpy as jnp

    from pufferfish_jax.model.transformer import count_params, flops_per_token
    from pufferfish_jax.sharding import single_device_mesh
    from pufferfish_jax.train.state import init_state, make_optimizer
    from pufferfish_jax.train.step import make_train_step

    shape = parse_shape(args.shape)
    spec, train_cfg = model_spec(shape, args.vocab, args.dtype)
    data = batches(shape, args.vocab, args.warmup + args.steps)
    optimizer = make_optimizer(train_cfg)
    state = jax.jit(init_state, static_argnums=(0, 1))(spec, optimizer, jax.random.key(0))
    if args.init_out:  # the baseline starts from these very parameters
        flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
                for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)}
        np.savez(args.init_out, **flat)
    step = make_train_step(spec, optimizer, train_cfg.grad_accum, single_device_mesh())
    lr = jnp.float32(LR)
    start = time.perf_counter()
    compiled = step.lower(state, jnp.asarray(data[0]), lr).compile()
    compile_s = time.perf_counter() - start
    losses = []
    for i in range(args.warmup):
        state, metrics = compiled(state, jnp.asarray(data[i]), lr)
        losses.append(metrics["loss"])
    jax.block_until_ready(state)
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        state, metrics = compiled(state, jnp.asarray(data[i]), lr)
        losses.append(metrics["loss"])  # fetched after the clock stops, as the loop fetches a step late
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "compile_s": compile_s, "losses": [float(x) for x in losses],
            "params": count_params(spec), "flops_per_token": flops_per_token(spec, spec.seq_len),
            "threads": os.cpu_count()}


def worker_torch(args) -> dict:
    import torch

    shape = parse_shape(args.shape)
    spec, train_cfg = model_spec(shape, args.vocab, "float32")
    data = batches(shape, args.vocab, args.warmup + args.steps)
    torch.manual_seed(0)
    model = TorchLlama(spec)
    if args.init_in:
        model.load_ours(dict(np.load(args.init_in)))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": train_cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(train_cfg.beta1, train_cfg.beta2), eps=1e-8)
    autocast = args.dtype == "bfloat16"

    def train_step(window):
        window = torch.from_numpy(window).long()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(window[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), window[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if train_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        opt.step()
        return loss.detach()

    losses = [train_step(data[i]) for i in range(args.warmup)]
    start = time.perf_counter()
    losses += [train_step(data[i]) for i in range(args.warmup, args.warmup + args.steps)]
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "compile_s": 0.0, "losses": [float(x) for x in losses],
            "params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads()}


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
            x = x + self.w_o(o.transpose(1, 2).reshape(B, T, -1))
            h = self.mlp_norm(x)
            return x + self.w_down(torch.nn.functional.silu(self.w_gate(h)) * self.w_up(h))

    def rope(x, sin, cos):
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    class Llama(nn.Module):
        def __init__(self, s):
            super().__init__()
            from pufferfish_jax.model.layers import rope_table

            self.s = s
            self.embed = nn.Embedding(s.vocab_size, s.d_model)
            self.blocks = nn.ModuleList(Block(s) for _ in range(s.num_layers))
            self.final_norm = RMSNorm(s.d_model, s.norm_eps)
            sin, cos = rope_table(s.seq_len, s.head_dim, s.rope_theta)
            self.register_buffer("sin", torch.from_numpy(sin)[:, None, :], persistent=False)  # [T, 1, R]
            self.register_buffer("cos", torch.from_numpy(cos)[:, None, :], persistent=False)
            for name, p in self.named_parameters():
                if p.ndim >= 2:
                    std = s.out_std if name.endswith(("w_o.weight", "w_down.weight")) else s.init_std
                    nn.init.normal_(p, std=std)

        def forward(self, tokens):
            T = tokens.shape[1]
            x = self.embed(tokens)
            for block in self.blocks:
                x = block(x, self.sin[:T], self.cos[:T])
            return self.final_norm(x) @ self.embed.weight.T  # autocast runs it in bf16 when on

        @torch.no_grad()
        def load_ours(self, flat: dict):
            """Copies our parameter tree (flattened 'block_0/attn/w_q' keys) into this module."""
            s = self.s
            self.embed.weight.copy_(torch.from_numpy(flat["embed/embedding"]))
            self.final_norm.scale.copy_(torch.from_numpy(flat["final_norm/scale"]))
            for i, b in enumerate(self.blocks):
                get = lambda k: torch.from_numpy(flat[f"block_{i}/{k}"])
                b.attn_norm.scale.copy_(get("attn_norm/scale"))
                b.mlp_norm.scale.copy_(get("mlp_norm/scale"))
                for name in ("w_q", "w_k", "w_v"):
                    getattr(b, name).weight.copy_(get(f"attn/{name}").reshape(s.d_model, -1).T)
                b.w_o.weight.copy_(get("attn/w_o").reshape(-1, s.d_model).T)
                for name in ("w_gate", "w_up", "w_down"):
                    getattr(b, name).weight.copy_(get(f"mlp/{name}").T)

    return Llama


def TorchLlama(spec):
    return torch_llama_class()(spec)


WORKERS = {"peak": worker_peak, "ours": worker_ours, "torch": worker_torch}


# ------------------------------------------------------------------------------------------ driver


def spawn(kind: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if kind == "ours":  # the allocator setting `python -m pufferfish_jax` re-runs itself with
        from pufferfish_jax.host_memory import huge_page_env

        env = huge_page_env(env) or env
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated LAYERSxDxSEQxBATCH")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--ours-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--loss-tol", type=float, default=0.05, help="max |final loss ours - torch fp32| (nats)")
    p.add_argument("--json", default="", help="also write the raw results here")
    p.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    p.add_argument("--report", default="", help="print the table of a --json file written earlier (same flags)")
    # worker-only
    p.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--init-out", default="", help=argparse.SUPPRESS)
    p.add_argument("--init-in", default="", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        result = WORKERS[args.worker](args)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    cpu = describe_cpu()
    if not args.report:  # a report prints the CPU its --json file recorded
        print(f"cpu: {cpu}", flush=True)
    if importlib.util.find_spec("torch") is None and not args.report:
        raise SystemExit("bench_train needs PyTorch for the baseline: pip install torch==2.13.0 (CPU build; benchmark only)")
    shapes = [parse_shape(s) for s in args.shapes.split(",")]
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        print(f"cpu: {saved.get('cpu', 'not recorded in ' + args.report)}")
        return report(saved["runs"], shapes, saved["peak"], args, saved.get("cpu", ""))
    common = dict(vocab=args.vocab, steps=args.steps, warmup=args.warmup)
    runs: dict = {}
    peaks = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            print(f"repeat {r + 1}/{args.repeats} matmul peak ...", file=sys.stderr)
            peaks.append(spawn("peak"))
            for shape in shapes:
                key = "x".join(map(str, shape))
                init = Path(tmp) / f"{key}.npz"
                for name, kind, dtype in (("ours", "ours", args.ours_dtype), ("torch fp32", "torch", "float32"),
                                          ("torch bf16", "torch", "bfloat16")):
                    print(f"repeat {r + 1}/{args.repeats} {key} {name} ...", file=sys.stderr)
                    io = {"init_out": init} if kind == "ours" else {"init_in": init}
                    runs.setdefault(key, {}).setdefault(name, []).append(
                        spawn(kind, shape=key, dtype=dtype, **common, **io))
    # The peak is the best the machine showed: load from other jobs only ever lowers a probe.
    peak = {dtype: max(p[dtype] for p in peaks) for dtype in ("fp32", "bf16")}
    report(runs, shapes, peak, args, cpu)


def report(runs: dict, shapes, peak: dict, args, cpu: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from pufferfish_jax.model.transformer import count_params, flops_per_token

    title = (f"train step speed, median of {args.repeats} (vocab {args.vocab}, {args.steps} steps after {args.warmup} "
             f"warm-up; matmul peak fp32 {peak['fp32'] / 1e9:.0f}, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s)")
    columns = ("shape L x D x T x B", "params", "run", "tokens/s", "GFLOP/s", "MFU", "compile s", "peak RSS MiB",
               "loss@N", "ours/torch")
    rows, failures, summary = [], [], {}
    for shape in shapes:
        key = "x".join(map(str, shape))
        spec, _ = model_spec(shape, args.vocab, args.ours_dtype)
        tokens_per_step = shape[2] * shape[3]
        fpt = flops_per_token(spec, spec.seq_len)
        med = {}
        for name, results in runs[key].items():
            tps = float(np.median([tokens_per_step * args.steps / r["seconds"] for r in results]))
            med[name] = dict(tps=tps, compile=float(np.median([r["compile_s"] for r in results])),
                             rss=float(np.median([r["peak_rss_mib"] for r in results])),
                             loss=float(np.median([np.mean(r["losses"][-3:]) for r in results])),
                             params=results[0]["params"])
        if len({m["params"] for m in med.values()} | {count_params(spec)}) != 1:
            failures.append(f"{key}: parameter counts differ {[m['params'] for m in med.values()]}")
        best_torch = max(med["torch fp32"]["tps"], med["torch bf16"]["tps"])
        ratio = med["ours"]["tps"] / best_torch
        if abs(med["ours"]["loss"] - med["torch fp32"]["loss"]) > args.loss_tol:
            failures.append(f"{key}: loss after {args.warmup + args.steps} steps differs: ours "
                            f"{med['ours']['loss']:.4f}, torch fp32 {med['torch fp32']['loss']:.4f}")
        summary[key] = {**med, "ratio": ratio}
        for name, m in med.items():
            bf16 = name == "torch bf16" or (name == "ours" and args.ours_dtype == "bfloat16")
            flops = m["tps"] * fpt
            label = f"{name} ({args.ours_dtype})" if name == "ours" else name
            rows.append((key if name == "ours" else "", f"{m['params']:,}" if name == "ours" else "", label,
                         f"{m['tps']:,.0f}", f"{flops / 1e9:.1f}", f"{flops / peak['bf16' if bf16 else 'fp32']:.0%}",
                         f"{m['compile']:.1f}" if name == "ours" else "-", f"{m['rss']:,.0f}", f"{m['loss']:.3f}",
                         f"{ratio:.2f}" if name == "ours" else ""))
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col in ("shape L x D x T x B", "run") else "right")
    for row in rows:
        table.add_row(*row)
    Console(highlight=False, width=160).print(table)
    if args.markdown:
        print(f"\ncpu: {cpu}\n\n{title}\n\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    print("MFU: achieved FLOP/s over the highest matmul rate measured in this run in the run's precision "
          "(bf16 inputs with fp32 accumulation for bf16 runs); loss@N: mean of the last 3 step losses.")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "peak": peak, "runs": runs, "summary": summary}, indent=1))
    if failures:
        raise SystemExit("FAILED: " + "; ".join(failures))


if __name__ == "__main__":
    main()

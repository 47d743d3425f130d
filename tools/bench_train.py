#!/usr/bin/env python
"""Training speed: our jitted train step against the same Llama in PyTorch, at the shapes the planner picks.

    python tools/bench_train.py [--budgets 1m,2m,5m,10m | --shapes 2x128x256x16,...] [--repeats 3]
                                [--steps 50] [--warmup 3] [--ours-dtypes float32,bfloat16]
                                [--baselines eager,compile] [--fast] [--json FILE]

Shapes: by default the planner's choice for an AdamW run (its Python API, on this machine's
calibration cache, as `just plan budget=B train.optimizer=adamw` would) for each of `--budgets`,
duplicates merged; `--shapes` names them instead (layers x d_model x seq_len x batch; heads from
the planner's ladder). Data: the built-in `wiki` corpus through our data path (tokenizer, token
cache, `train_batches` at seed 0), the same batches for every run. Ours is the step `just train
train.optimizer=adamw` runs (make_optimizer, init_state, make_train_step: AdamW, grad clip, decay
mask, donated state) in float32 and in bfloat16. PyTorch
(tools/bench_train_torch.py) is the same architecture from *our* initial parameters, with AdamW
`foreach=True`, eager and under `torch.compile`, each in float32 and in our bfloat16 policy
(bfloat16 residual stream and matmul inputs, float32 accumulation, norms, RoPE, loss and master
weights; see that file). Compile times (ours: a cold XLA compile; torch.compile: its first step past
a plain one, cold inductor cache) are excluded from tokens/s.

Loss check: every run's loss (mean of the last 5 of warmup + steps steps, >= 50 by default) must
be within `--loss-tol` nats of torch eager float32's, or the tool fails. Every (framework, mode,
dtype, shape) runs in its own subprocess; repeats interleave all runs, medians are reported. MFU:
achieved FLOP/s (`flops_per_token`, the one count the planner and dashboard use) over the matmul
peak measured in this run (`hardware.matmul_rate`) in the run's dtype. Ours runs under the allocator
setting `python -m pufferfish_jax` gives itself (host_memory: glibc.malloc.hugetlb=1).
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_BUDGETS = "1m,2m,5m,10m"
FAST = dict(shapes="1x64x32x4", steps=4, warmup=1, repeats=1, baselines="eager")
LR = 1e-3
LOSS_TAIL = 5  # the loss compared is the mean of the last LOSS_TAIL step losses
# (label, worker, dtype, torch.compile?); "ours float32" writes the initial parameters the others load
RUNS = (("ours float32", "ours", "float32", False), ("ours bfloat16", "ours", "bfloat16", False),
        ("torch eager float32", "torch", "float32", False), ("torch eager bfloat16", "torch", "bfloat16", False),
        ("torch compile float32", "torch", "float32", True), ("torch compile bfloat16", "torch", "bfloat16", True))
REFERENCE = "torch eager float32"


def parse_shape(text: str) -> tuple[int, int, int, int]:
    layers, d_model, seq_len, batch = (int(x) for x in text.lower().split("x"))
    return layers, d_model, seq_len, batch


def shape_key(shape) -> str:
    return "x".join(map(str, shape))


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
    cfg.train.optimizer = "adamw"  # torch's side is AdamW; Muon's extra cost: bench_recipe.py --step-cost
    return spec_for(cfg, (layers, d_model, *heads)), cfg.train


def count_params_of(shape, vocab: int) -> int:
    from pufferfish_jax.model.transformer import count_params

    return count_params(model_spec(shape, vocab, "float32")[0])


def selected_runs(ours_dtypes: str, baselines: str) -> list[tuple]:
    """The RUNS the flags ask for; "ours float32" always (its parameters start every other run)."""
    dtypes, modes = set(ours_dtypes.split(",")), set(baselines.split(","))
    keep = [r for r in RUNS if (r[1] == "ours" and (r[2] in dtypes or r[2] == "float32"))
            or (r[1] == "torch" and ("compile" if r[3] else "eager") in modes)]
    return keep


# ----------------------------------------------------------------------------------------- workers


def worker_setup(args) -> dict:
    """The shapes (the planner's for each budget, or --shapes) and, for each, warmup + steps
    batches of the built-in corpus through our data path, saved to --out-dir/<shape>.npy."""
    from pufferfish_jax import config as config_lib
    from pufferfish_jax import session
    from pufferfish_jax.data.pipeline import train_batches

    chosen: dict[str, dict] = {}
    for budget in args.budgets.split(",") if not args.shapes else [""]:
        # the shapes an AdamW run plans: the step compared is AdamW's (model_spec)
        cfg, keys = config_lib.from_command_line([f"budget={budget}" if budget else "steps=1", "train.optimizer=adamw"])
        data, plan = session.prepare(cfg, keys, time.time(), session.start(cfg))
        if not budget:
            shapes = [parse_shape(s) for s in args.shapes.split(",")]
        else:
            m = plan.model
            shapes = [(m["num_layers"], m["d_model"], plan.seq_len, plan.batch_size)]
            spec, _ = model_spec(shapes[0], data.vocab_size, m["dtype"])
            assert (spec.num_heads, spec.num_kv_heads) == (m["num_heads"], m["num_kv_heads"]), "ladder heads differ"
        for shape in shapes:
            entry = chosen.setdefault(shape_key(shape), {"budgets": [], "planner_dtype": []})
            if budget:
                entry["budgets"].append(budget)
                entry["planner_dtype"].append(plan.model["dtype"])
    for key in chosen:
        _, _, seq_len, batch = parse_shape(key)
        it = train_batches(data.train_tokens, seq_len=seq_len, batch_size=batch, seed=0)
        windows = np.stack([next(it) for _ in range(args.warmup + args.steps)])
        it.close()
        np.save(Path(args.out_dir) / f"{key}.npy", windows)
    return {"shapes": chosen, "vocab": data.vocab_size, "corpus": cfg.data.corpus}


def worker_peak(args) -> dict:
    """The probe `just hardware` and the training dashboard use (hardware.matmul_rate, same
    sizes and time), so the peaks here are theirs."""
    from pufferfish_jax.budget.hardware import matmul_rate

    return {"float32": matmul_rate("float32"), "bfloat16": matmul_rate("bfloat16")}


def describe_cpu() -> str:
    """The host CPU's model and the SIMD features that set matmul speed (bf16 is emulated, slower
    than fp32, without AVX512_BF16 or ARM bf16), so results from different CPUs are not mixed up."""
    from pufferfish_jax.budget.hardware import cpu_info

    return cpu_info().describe()


def train_ours(spec, train_cfg, data: np.ndarray, warmup: int, init_out: str = "") -> dict:
    """Our train step on data[i] for every i; the clock covers the steps after `warmup`."""
    import jax
    import jax.numpy as jnp

    from pufferfish_jax.sharding import single_device_mesh
    from pufferfish_jax.train.state import init_state, make_optimizer
    from pufferfish_jax.train.step import make_train_step

    optimizer = make_optimizer(train_cfg)
    state = jax.jit(init_state, static_argnums=(0, 1))(spec, optimizer, jax.random.key(0))
    if init_out:  # the baselines start from these very parameters
        flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
                for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)}
        np.savez(init_out, **flat)
    step = make_train_step(spec, optimizer, train_cfg.grad_accum, single_device_mesh())
    lr = jnp.float32(LR)
    start = time.perf_counter()
    compiled = step.lower(state, jnp.asarray(data[0]), lr).compile()
    compile_s = time.perf_counter() - start
    losses = []
    for i in range(warmup):
        state, metrics = compiled(state, jnp.asarray(data[i]), lr)
        losses.append(metrics["loss"])
    jax.block_until_ready(state)
    start = time.perf_counter()
    for i in range(warmup, len(data)):
        state, metrics = compiled(state, jnp.asarray(data[i]), lr)
        losses.append(metrics["loss"])  # fetched after the clock stops, as the loop fetches a step late
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "compile_s": compile_s, "losses": [float(x) for x in losses]}


def worker_ours(args) -> dict:
    from pufferfish_jax.model.transformer import count_params

    spec, train_cfg = model_spec(parse_shape(args.shape), args.vocab, args.dtype)
    result = train_ours(spec, train_cfg, np.load(args.data), args.warmup, args.init_out)
    return {**result, "params": count_params(spec), "threads": os.cpu_count()}


def worker_torch(args) -> dict:
    import bench_train_torch

    spec, train_cfg = model_spec(parse_shape(args.shape), args.vocab, "float32")
    return bench_train_torch.run(spec, train_cfg, dict(np.load(args.init_in)), np.load(args.data), dtype=args.dtype,
                                 compiled=args.compiled == "1", warmup=args.warmup, lr=LR)


WORKERS = {"setup": worker_setup, "peak": worker_peak, "ours": worker_ours, "torch": worker_torch}


# ------------------------------------------------------------------------------------------ driver


def spawn(kind: str, tmp: Path, **kw) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if kind == "ours":  # the allocator setting `python -m pufferfish_jax` re-runs itself with
        from pufferfish_jax.host_memory import huge_page_env

        env = huge_page_env(env) or env
    if kind == "torch":  # a cold inductor cache for every run, as ours compiles cold
        env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(dir=tmp)
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def options(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", default=DEFAULT_BUDGETS, help="the planner's shape for each of these budgets")
    p.add_argument("--shapes", default="", help="instead: comma-separated LAYERSxDxSEQxBATCH")
    p.add_argument("--steps", type=int, default=50, help="timed steps per run (also the loss check's)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--ours-dtypes", default="float32,bfloat16")
    p.add_argument("--baselines", default="eager,compile", help="torch modes: eager, compile or both")
    p.add_argument("--loss-tol", type=float, default=0.05, help="max |loss - torch eager float32 loss| (nats)")
    p.add_argument("--fast", action="store_true", help=f"a smoke run: {FAST}")
    p.add_argument("--json", default="", help="also write the raw results here")
    p.add_argument("--report", default="", help="print the table of a --json file written earlier")
    # worker-only
    p.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    for name in ("shape", "dtype", "init-out", "init-in", "data", "out-dir", "compiled", "vocab"):
        p.add_argument(f"--{name}", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.fast:
        for key, value in FAST.items():
            setattr(args, key, value)
    if args.vocab:
        args.vocab = int(args.vocab)
    return args


def main(argv=None) -> None:
    args = options(argv)
    if args.worker:
        result = WORKERS[args.worker](args)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        print(f"cpu: {saved['cpu']}")
        return print_report(saved, args)
    print(f"cpu: {describe_cpu()}", flush=True)
    runs = selected_runs(args.ours_dtypes, args.baselines)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        started = time.perf_counter()
        setup = spawn("setup", tmp, budgets=args.budgets, shapes=args.shapes, steps=args.steps,
                      warmup=args.warmup, out_dir=tmp)
        print(f"shapes: {setup['shapes']} ({time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)
        results: dict = {"cpu": describe_cpu(), "setup": setup, "peaks": [], "runs": {}, "steps": args.steps,
                         "warmup": args.warmup, "repeats": args.repeats}
        for r in range(args.repeats):
            print(f"repeat {r + 1}/{args.repeats}: matmul peak", file=sys.stderr, flush=True)
            results["peaks"].append(spawn("peak", tmp))
            for key in setup["shapes"]:
                common = dict(shape=key, vocab=setup["vocab"], warmup=args.warmup, data=tmp / f"{key}.npy")
                init = tmp / f"{key}.init.npz"
                for label, kind, dtype, compiled in runs:
                    print(f"repeat {r + 1}/{args.repeats} {key} {label} ({time.perf_counter() - started:.0f}s)",
                          file=sys.stderr, flush=True)
                    io = dict(init_out=init if dtype == "float32" else "") if kind == "ours" else \
                        dict(init_in=init, compiled=int(compiled))
                    results["runs"].setdefault(key, {}).setdefault(label, []).append(
                        spawn(kind, tmp, dtype=dtype, **common, **io))
        results["wall_s"] = time.perf_counter() - started
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print_report(results, args)


# ------------------------------------------------------------------------------------------ report


def summarize(results: dict, loss_tol: float) -> tuple[list[dict], list[str]]:
    """Per shape and run, the medians over repeats; per shape the ratios of ours (the faster dtype)
    over the faster torch eager and torch.compile run; and the failed checks."""
    from pufferfish_jax.model.transformer import count_params, flops_per_token

    peak = {d: max(p[d] for p in results["peaks"]) for d in ("float32", "bfloat16")}
    vocab, steps = results["setup"]["vocab"], results["steps"]
    shapes, failures = [], []
    for key, by_label in results["runs"].items():
        shape = parse_shape(key)
        spec, _ = model_spec(shape, vocab, "float32")
        fpt = flops_per_token(spec, spec.seq_len)
        rows = {}
        for label, rs in by_label.items():
            dtype = label.split()[-1]
            tps = float(np.median([shape[2] * shape[3] * steps / r["seconds"] for r in rs]))
            rows[label] = dict(tps=tps, mfu=tps * fpt / peak[dtype], gflops=tps * fpt / 1e9,
                               compile_s=float(np.median([r["compile_s"] for r in rs])),
                               rss=float(np.median([r["peak_rss_mib"] for r in rs])),
                               loss=float(np.median([np.mean(r["losses"][-LOSS_TAIL:]) for r in rs])),
                               params=rs[0]["params"])
        if len({m["params"] for m in rows.values()} | {count_params(spec)}) != 1:
            failures.append(f"{key}: parameter counts differ {[m['params'] for m in rows.values()]}")
        reference = rows.get(REFERENCE) or rows.get("torch compile float32")
        for label, m in rows.items():
            if reference and abs(m["loss"] - reference["loss"]) > loss_tol:
                failures.append(f"{key}: {label} loss {m['loss']:.4f} vs torch float32 {reference['loss']:.4f}")
        best = lambda prefix: max((m["tps"] for l, m in rows.items() if l.startswith(prefix)), default=0.0)  # noqa: E731
        ours = best("ours")
        shapes.append(dict(key=key, rows=rows, ours=ours, ours_dtype=max(
            (l for l in rows if l.startswith("ours")), key=lambda l: rows[l]["tps"]).split()[-1],
            vs_eager=ours / best("torch eager") if best("torch eager") else None,
            vs_compile=ours / best("torch compile") if best("torch compile") else None,
            **results["setup"]["shapes"][key]))
    return shapes, failures


def print_report(results: dict, args) -> None:
    shapes, failures = summarize(results, args.loss_tol)
    peak = {d: max(p[d] for p in results["peaks"]) for d in ("float32", "bfloat16")}
    steps, warmup = results["steps"], results["warmup"]
    print(f"\ncorpus {results['setup']['corpus']}, vocab {results['setup']['vocab']}; {steps} timed steps after "
          f"{warmup} warm-up, median of {results['repeats']}; matmul peak float32 {peak['float32'] / 1e9:.0f}, "
          f"bfloat16 {peak['bfloat16'] / 1e9:.0f} GFLOP/s; dtype policy on both sides: ours "
          "(bfloat16 = bf16 residual and matmul inputs, fp32 accumulation, norms, loss and master weights)\n")
    columns = ("shape L x D x T x B", "budgets", "run", "tokens/s", "GFLOP/s", "MFU", "compile s", "peak RSS MiB",
               f"loss@{steps + warmup}", "ours / eager", "ours / compile")
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for s in shapes:
        for i, (label, m) in enumerate(s["rows"].items()):
            first = i == 0
            ratio = (lambda x: f"**{x:.2f}**" if x else "-")
            print("| " + " | ".join((
                s["key"] if first else "", ",".join(s["budgets"]) if first else "", label, f"{m['tps']:,.0f}",
                f"{m['gflops']:.1f}", f"{m['mfu']:.0%}", f"{m['compile_s']:.1f}" if m["compile_s"] else "-",
                f"{m['rss']:,.0f}", f"{m['loss']:.3f}", ratio(s["vs_eager"]) if first else "",
                ratio(s["vs_compile"]) if first else "")) + " |")
    print(f"\nours / X: ours in its faster dtype over the faster dtype of X. MFU: over the measured matmul peak "
          f"of the run's dtype. loss: mean of the last {LOSS_TAIL} step losses; every run within "
          f"{args.loss_tol} nats of {REFERENCE}. Wall time {results.get('wall_s', 0):.0f}s.")
    if failures:
        raise SystemExit("FAILED: " + "; ".join(failures))


if __name__ == "__main__":
    main()

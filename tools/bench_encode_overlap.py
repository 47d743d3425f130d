#!/usr/bin/env python
"""Which way of tokenizing in the background leaves the training step faster: a thread driving the
`tokenizers` batch encoder (Rust, GIL released) or a worker process doing the same.

    python tools/bench_encode_overlap.py [--steps 40] [--corpus wiki]

Times `--steps` training steps of a small model (2 layers, d 128, batch 8 x 256) alone, then while
a thread encodes 1,024-document chunks without pause, then while a worker process does. Prints the
median step time and the encoder's MB/s in each case, with the CPU. Indicative on a shared box.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_data import cpu, source_paragraphs  # noqa: E402


def encode_forever(tokenizer_json: str, docs: list[str], stop, counter) -> None:
    """Encodes `docs` in chunks until `stop` is set; adds the bytes encoded to `counter`."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(tokenizer_json)
    size = sum(len(d.encode()) for d in docs)
    while not stop.is_set():
        tok.encode_batch_fast(docs, add_special_tokens=False)
        with counter.get_lock():
            counter.value += size


def time_steps(steps: int) -> float:
    """Median seconds per step of the small model (compiled before timing)."""
    import jax

    from pufferfish_jax import config as config_lib, sharding
    from pufferfish_jax.model.spec import ModelSpec
    from pufferfish_jax.train.state import create_state, make_optimizer
    from pufferfish_jax.train.step import make_train_step
    cfg = config_lib.defaults()
    cfg.model.num_layers, cfg.model.d_model, cfg.model.seq_len, cfg.model.vocab_size = 2, 128, 256, 8192
    spec, optimizer, mesh = ModelSpec.from_config(cfg.model, cfg.moe), make_optimizer(cfg.train), sharding.make_mesh(cfg.mesh)
    state, step = create_state(spec, optimizer, 0, mesh), make_train_step(spec, optimizer, 1, mesh)
    rows = np.random.default_rng(0).integers(0, 8192, (8, 257), dtype=np.int32)
    batch = sharding.global_batch(rows, mesh, 8)
    state, values = step(state, batch, np.float32(1e-3))
    jax.block_until_ready(values)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        state, values = step(state, batch, np.float32(1e-3))
        jax.block_until_ready(values)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    from pufferfish_jax import config as config_lib
    from pufferfish_jax.data.tokenizer import train_tokenizer
    docs = ["\n".join(p) for p in zip(*[iter(source_paragraphs(config_lib.cache_dir(config_lib.defaults())))] * 4)][:1024]
    tok_json = train_tokenizer(docs, 8192).to_str()
    print(f"CPU: {cpu()}")
    rows = []
    for how in ("alone", "thread", "process"):
        counter = multiprocessing.Value("q", 0)
        stop = multiprocessing.Event() if how == "process" else threading.Event()
        worker = (multiprocessing.Process(target=encode_forever, args=(tok_json, docs, stop, counter)) if how == "process"
                  else threading.Thread(target=encode_forever, args=(tok_json, docs, stop, counter)))
        if how != "alone":
            worker.start()
        started = time.perf_counter()
        step_s = time_steps(args.steps)
        elapsed = time.perf_counter() - started
        stop.set()
        if how != "alone":
            worker.join()
        rows.append(f"| {how} | {step_s * 1000:.0f} | {counter.value / 1e6 / elapsed:.2f} |")
        print(rows[-1], flush=True)
    print("\n| encoder | median step ms | encoder MB/s |\n|---|---:|---:|\n" + "\n".join(rows))


if __name__ == "__main__":
    main()

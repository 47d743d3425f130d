"""The eight stages of a pipeline, each a thin call into the project's own machinery.

corpus -> tokenizer -> tokens -> plan -> train -> evaluate, sample -> report. Bulky data (corpus
text, token streams) stays in the shared cache, which is keyed by content; the run dir holds each
stage's record of what it produced (corpus.json, tokenizer.json, tokens.json, plan.json), the
training run itself (train/, a normal run dir: `just generate runs/quick/train` works), the
evaluation, the samples and the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import ml_collections

from pipelines.records import HELD_OUT, STAGE_NAMES, read_json, write_json
from pipelines.report import write_report
from pipelines.runner import Context, Stage
from pufferfish_jax import config as config_lib
from pufferfish_jax import rundir, session
from pufferfish_jax.budget.hardware import probe
from pufferfish_jax.data.corpora import corpus_fingerprint
from pufferfish_jax.data.pipeline import unigram_bpb
from pufferfish_jax.data.prepare import prepare_data, tokenizer_for
from pufferfish_jax.data.prepare import scan_split, sided_documents
from pufferfish_jax.data.tokenizer import tokenizer_fingerprint
from pufferfish_jax.display import console, plan_table
from pufferfish_jax.errors import ConfigError
from pufferfish_jax.generate import Sampling
from pufferfish_jax.repl import write_continuation
from pufferfish_jax.train import checkpoint

TRAINING_KEYS = ("model", "train", "budget")
# The mesh shape sets the global batch the planner picks; where process 0 listens does not.
PLAN_KEYS = TRAINING_KEYS + ("mesh.data", "mesh.fsdp", "mesh.tensor")


class Interrupted(Exception):
    """Training stopped on Ctrl-C or SIGTERM with a checkpoint saved; the next run resumes it."""


def stage_names(cfg: ml_collections.ConfigDict) -> list[str]:
    names = [s.strip() for s in cfg.pipeline.stages.split(",") if s.strip()]
    unknown = [n for n in names if n not in STAGE_NAMES]
    if unknown or not names:
        raise ConfigError(f"pipeline.stages={cfg.pipeline.stages!r}: expected stage names from "
                          f"{','.join(STAGE_NAMES)}")
    return names


def eval_sets(cfg: ml_collections.ConfigDict) -> list[tuple[str, str]]:
    """eval.sets as (name, source) pairs: `NAME=SOURCE` or a bare SOURCE named after itself."""
    sets = []
    for item in (s.strip() for s in cfg.eval.sets.split(",")):
        if not item:
            continue
        name, _, source = item.partition("=") if "=" in item else (item, "", item)
        name, source = name.strip(), source.strip()
        if not name or not source:
            raise ConfigError(f"eval.sets item {item!r} is not SOURCE or NAME=SOURCE")
        sets.append((name, source))
    names = [n for n, _ in sets]
    if duplicates := sorted({n for n in names if names.count(n) > 1}):
        raise ConfigError(f"eval.sets names {', '.join(duplicates)} more than once; give each set its own NAME=")
    return sets


def prompts(cfg: ml_collections.ConfigDict) -> list[str]:
    return [p for p in cfg.sample.prompts.split("|") if p.strip()]


def sampling(cfg: ml_collections.ConfigDict) -> Sampling:
    """The sample section as sampling settings (one validation, one generation path); the
    section's keys are Sampling's field names."""
    fields = {f.name for f in dataclasses.fields(Sampling)}
    return Sampling(**{k: v for k, v in cfg.sample.items() if k in fields and k != "prompts"})


def check(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Validates the pipeline, eval and sample sections (config.validate covers the rest)."""
    stage_names(cfg)
    eval_sets(cfg)
    if not 0 < cfg.sample.max_new_tokens < cfg.model.seq_len:
        raise ConfigError(f"sample.max_new_tokens={cfg.sample.max_new_tokens} must be between 1 and "
                          f"model.seq_len - 1 ({cfg.model.seq_len - 1})")
    try:
        sampling(cfg).check(cfg.model.seq_len)
    except ConfigError as e:
        raise ConfigError(f"sample section: {e}") from None
    if cfg.eval.max_chars < 0:
        raise ConfigError(f"eval.max_chars={cfg.eval.max_chars} must be >= 0 (0 = all)")
    return cfg


# ----------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _status(label: str) -> Iterator:
    """A spinner whose text the library's `log` callbacks update."""
    with console.status(label) as status:
        yield lambda s: status.update(s)


def _cache(cfg: ml_collections.ConfigDict) -> Path:
    return config_lib.cache_dir(cfg)


def _corpus_sources(cfg: ml_collections.ConfigDict) -> list:
    return [corpus_fingerprint(cfg.data.corpus), corpus_fingerprint(cfg.data.val_source) if cfg.data.val_source else ""]


def _tokenizer_sources(cfg: ml_collections.ConfigDict) -> list:
    if not cfg.data.tokenizer:
        return []
    path = Path(cfg.data.tokenizer).expanduser()
    return [hashlib.sha256(path.read_bytes()).hexdigest()] if path.is_file() else [str(path)]


def _eval_sources(cfg: ml_collections.ConfigDict) -> list:
    return [[name, source if source == HELD_OUT else corpus_fingerprint(source)] for name, source in eval_sets(cfg)]


def _restore_trained(ctx: Context) -> session.Restored:
    """The train stage's final checkpoint."""
    return session.restore(ctx.run_dir / "train", cache_dir=_cache(ctx.cfg))


def _hardware() -> dict:
    hw = probe().to_dict()
    return hw | {
        "cpu": hw["cpu_model"], "python": sys.version.split()[0], "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", ""), "os": platform.platform()}


# ----------------------------------------------------------------------------- stages
def corpus(ctx: Context) -> dict:
    """Fetches the corpus (built-ins are downloaded once into the cache) and splits it."""
    record = {"corpus": ctx.cfg.data.corpus, "val_source": ctx.cfg.data.val_source or "a split of the corpus"}
    counts = {f"{side}_{what}": 0 for side in ("train", "val") for what in ("documents", "chars", "bytes")}
    with _status("corpus: loading") as log:
        split = scan_split(ctx.cfg.data, _cache(ctx.cfg), log=log)
        for doc, data, held_out, _ in sided_documents(ctx.cfg.data, split, _cache(ctx.cfg), log):
            if held_out is None:  # held out past a head: on neither side (prepare.Split.head_bytes)
                continue
            side = "val" if held_out else "train"
            counts[f"{side}_documents"] += 1
            counts[f"{side}_chars"] += len(doc)
            counts[f"{side}_bytes"] += len(data)
    record |= counts
    write_json(ctx.run_dir / "corpus.json", record)
    return record


def tokenizer(ctx: Context) -> dict:
    """The byte-level BPE trained on the training split (or data.tokenizer), as tokenizer.json."""
    with _status("tokenizer: loading the training split") as log:
        tok = tokenizer_for(ctx.cfg.data, _cache(ctx.cfg), log=log)
    (ctx.run_dir / "tokenizer.json").write_text(tok.to_str())
    return {"vocab_size": tok.get_vocab_size(), "source": ctx.cfg.data.tokenizer or "trained byte-level BPE",
            "fingerprint": tokenizer_fingerprint(tok)}


def tokens(ctx: Context) -> dict:
    """Token streams of both splits (cached by content) and the unigram baseline of the split."""
    with _status("tokens: encoding") as log:
        data = prepare_data(ctx.cfg.data, _cache(ctx.cfg), log=log)
    record = {"train_tokens": int(data.train_tokens.size), "val_tokens": int(data.val_tokens.size),
              "train_bytes": data.train_bytes, "val_bytes": data.val_bytes, "vocab_size": data.vocab_size,
              "bytes_per_token": data.train_bytes / max(data.train_tokens.size, 1),
              "unigram_bpb": unigram_bpb(data.train_tokens, data.val_tokens, data.val_bytes, data.vocab_size),
              "data_fingerprint": data.fingerprint}
    write_json(ctx.run_dir / "tokens.json", record)
    return record


def plan(ctx: Context) -> dict:
    """The planner's choice for the budget (or the fixed-steps plan), as the train command makes it."""
    with _status("plan: preparing") as log:
        _, chosen = session.prepare(ctx.cfg, ctx.user_keys, ctx.started_at, session.start(ctx.cfg), log=log)
    write_json(ctx.run_dir / "plan.json", chosen.to_dict())
    m = chosen.model
    budget = f" in a {chosen.budget_s:.0f}s budget" if chosen.budget_s else ""
    console.print(f"plan: {m['num_layers']} layers x d {m['d_model']}, batch {chosen.batch_size}, "
                  f"{chosen.steps:,} steps{budget}", markup=False)
    return {"num_layers": m["num_layers"], "d_model": m["d_model"], "batch_size": chosen.batch_size,
            "steps": chosen.steps, "step_s": chosen.step_s}


def train(ctx: Context) -> dict:
    """`just train` with the plan stage's plan into <run_dir>/train; an unfinished one resumes
    from its newest checkpoint with what is left of its budget."""
    chosen = rundir.read_plan(ctx.run_dir)
    train_dir = Path(ctx.cfg.train.run_dir)
    resuming = bool(checkpoint.saved_steps(train_dir / "checkpoints"))
    # A plan made by an earlier command gets the budget it was made for, counted from now.
    started_at = ctx.started_at if resuming or "plan" in ctx.ran else time.time() - chosen.planning_s
    # Only training keys may differ from the interrupted attempt's (the fingerprint guarantees they don't).
    user_keys = {k for k in ctx.user_keys if k.split(".")[0] in TRAINING_KEYS + ("data",)}
    result = session.train(ctx.cfg, user_keys, started_at, session.start(ctx.cfg), plan=chosen,
                           log=lambda s: console.print(s, style="dim", markup=False),
                           on_plan=lambda p: console.print(plan_table(p)), display_console=console)
    if result.interrupted:
        raise Interrupted(f"training stopped with a checkpoint in {train_dir}; rerun the same command to resume it")
    write_json(ctx.run_dir / "hardware.json", _hardware())
    return read_json(train_dir, "outcome.json")


def evaluate(ctx: Context) -> dict:
    """Loss and bits per byte of the trained model on every eval set, against the one unigram
    baseline (session.TextEval)."""
    restored = _restore_trained(ctx)
    data = prepare_data(ctx.cfg.data, _cache(ctx.cfg))
    rows = []
    for name, source in eval_sets(ctx.cfg):
        with _status(f"evaluate: {name}") as log:
            result = session.evaluate_text(restored, source, train_tokens=data.train_tokens,
                                           batch_size=restored.cfg.train.batch_size, max_chars=ctx.cfg.eval.max_chars,
                                           val=data if source == HELD_OUT else None, log=log)
        row = {"name": name} | result.to_dict()
        console.print(f"evaluate: {name}: loss {row['val_loss']:.4f} nats/token, {row['val_bpb']:.4f} ± "
                      f"{row['val_bpb_se']:.4f} (SE) bits/byte "
                      f"(unigram {row['unigram_bpb']:.4f}) over {row['tokens']:,} tokens", markup=False)
        rows.append(row)
    write_json(ctx.run_dir / "eval.json", rows)
    return {row["name"]: round(row["val_bpb"], 4) for row in rows}


def sample(ctx: Context) -> dict:
    """Continues each prompt with the trained model, seeded."""
    restored = _restore_trained(ctx)
    spec, state, tok = restored.spec, restored.state, restored.tokenizer
    samples = []
    for number, prompt in enumerate(prompts(ctx.cfg), 1):
        try:
            new = write_continuation(spec, state.params, tok, prompt, sampling(ctx.cfg), moe_state=state.moe_state,
                                     out=io.StringIO())
        except ConfigError as e:
            raise ConfigError(f"sample prompt {number}: {e} (sample.prompts, sample.max_new_tokens)") from None
        samples.append({"prompt": prompt, "continuation": tok.decode(new), "new_tokens": len(new)})
        console.print(f"sample {number}: {prompt}{samples[-1]['continuation']}", markup=False)
    settings = dataclasses.asdict(sampling(ctx.cfg))
    write_json(ctx.run_dir / "samples.json", {"settings": settings, "samples": samples})
    return {"samples": len(samples)}


def report(ctx: Context) -> dict:
    path = write_report(ctx.run_dir, ctx.cfg)
    console.print(f"report: {path}", markup=False)
    return {"report": str(path)}


ALL_KEYS = tuple(sorted({key.split(".")[0] for key in config_lib.HELP}))

STAGES = (
    Stage("corpus", corpus, outputs=("corpus.json",),
          keys=("data.corpus", "data.val_source", "data.val_fraction", "data.val_min_tokens",
                "data.max_chars"), sources=_corpus_sources),
    Stage("tokenizer", tokenizer, outputs=("tokenizer.json",), inputs=("corpus",),
          keys=("data.vocab_size", "data.tokenizer"), sources=_tokenizer_sources),
    Stage("tokens", tokens, outputs=("tokens.json",), inputs=("corpus", "tokenizer")),
    Stage("plan", plan, outputs=("plan.json",), inputs=("tokens",), keys=PLAN_KEYS),
    Stage("train", train, outputs=("train", "hardware.json"), inputs=("plan", "tokens"), keys=PLAN_KEYS),
    Stage("evaluate", evaluate, outputs=("eval.json",), inputs=("train", "tokens"), keys=("eval",),
          sources=_eval_sources),
    Stage("sample", sample, outputs=("samples.json",), inputs=("train",), keys=("sample",)),
    # The report shows the whole config, so any change rewrites it (it takes a second).
    Stage("report", report, outputs=("report.md", "loss_curves.png"),
          inputs=("corpus", "tokenizer", "tokens", "plan", "train", "evaluate", "sample"), keys=ALL_KEYS),
)
assert tuple(s.name for s in STAGES) == STAGE_NAMES

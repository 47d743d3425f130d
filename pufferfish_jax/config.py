"""The configuration schema: one table of (key, default, help) from which everything else derives.

A single schema keeps defaults, documentation (README, `--help`, the config editor) and validation
from drifting apart. Configs are ml_collections ConfigDicts with sections model, train, data,
budget, mesh and moe (mixture of experts, off by default), plus the pipeline's pipeline, eval and
sample; they are saved as JSON in every run dir and checkpoint, and loaded back through the same
validation, so a saved config can never smuggle in a key the code does not know.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable

import ml_collections

from pufferfish_jax.errors import ConfigError
from pufferfish_jax.generate import Sampling
from pufferfish_jax.model import spec as spec_lib
from pufferfish_jax.model.spec import ModelSpec

SAMPLING = Sampling()  # the sample section's defaults are generation's own

SCHEMA: tuple[tuple[str, Any, str], ...] = (
    # model
    ("model.vocab_size", 0, "Vocabulary size of the embedding; 0 = the tokenizer's size."),
    ("model.num_layers", 4, "Transformer blocks."),
    ("model.d_model", 256, "Residual stream width."),
    ("model.num_heads", 8, "Query heads per attention layer."),
    ("model.num_kv_heads", 4, "Key/value heads (grouped-query attention); divides num_heads."),
    ("model.head_dim", 0, "Per-head width; 0 = d_model // num_heads."),
    ("model.ffn_hidden", 0, "SwiGLU hidden width; 0 = 8/3 * d_model rounded up to 64."),
    ("model.seq_len", 256, "Context length in tokens (training window and generation limit)."),
    ("model.rope_theta", 10000.0, "RoPE base frequency."),
    ("model.norm_eps", 1e-5, "RMSNorm epsilon."),
    ("model.tie_embeddings", True, "Share the token embedding with the LM head."),
    ("model.dtype", "bfloat16", "Compute dtype: bfloat16 | float32 (params and optimizer state stay float32)."),
    ("model.remat", "none", "Activation recomputation policy: none | full | save_dots."),
    ("model.attention", "auto", "Attention backend: auto | xla | blocked | cudnn | pallas | splash (auto: the fastest this platform runs; blocked: causal query blocks, fast on CPU)."),
    ("model.init_std", 0.02, "Std of the normal initializer for weights."),
    ("model.qk_norm", False, "RMSNorm on each head's queries and keys before RoPE."),
    ("model.zero_init_out", False, "Start the projections into the residual stream (attention output, FFN down) at zero."),
    ("model.mlp", "swiglu", "Dense FFN: swiglu | relu2 (squared ReLU, 3/2 the hidden width: same parameters)."),
    ("model.logit_softcap", 0.0, "Soft-cap the logits at this value (cap * tanh(logits / cap)); 0 = off."),
    # train
    ("train.steps", 0, "Optimizer steps; 0 = as many as the budget allows."),
    ("train.batch_size", 16, "Sequences per optimizer step (split over grad_accum micro-batches)."),
    ("train.grad_accum", 1, "Micro-batches accumulated per optimizer step."),
    ("train.optimizer", "muon", "muon | adamw (muon: Muon on the hidden matrices, AdamW at train.lr on embeddings, head, norms, routers; docs/recipe.md)."),
    ("train.lr", 0.0, "Peak AdamW learning rate (under muon, of the embeddings, head, norms, routers); 0 = the optimizer's measured default (adamw 3e-3, muon 6e-3)."),
    ("train.muon_lr", 0.01, "optimizer=muon: peak learning rate of the Muon matrices (follows the same schedule)."),
    ("train.muon_beta", 0.95, "optimizer=muon: Muon's (Nesterov) momentum."),
    ("train.muon_weight_decay", 0.0, "optimizer=muon: decoupled weight decay of the Muon matrices."),
    ("train.schedule", "wsd", "Learning-rate schedule: wsd (warmup, constant, linear warmdown to zero; docs/recipe.md) | cosine (decay to min_lr_ratio)."),
    ("train.min_lr_ratio", 0.1, "Final learning rate as a fraction of the peak (cosine floor)."),
    ("train.warmup_fraction", 0.05, "Fraction of the steps spent warming the learning rate up."),
    ("train.warmdown_fraction", 0.3, "schedule=wsd: the warmdown starts when this fraction of the training time (budget) or steps is left."),
    ("train.weight_decay", 0.1, "Decoupled weight decay (not applied to norms and embeddings)."),
    ("train.beta1", 0.9, "AdamW beta1."),
    ("train.beta2", 0.95, "AdamW beta2."),
    ("train.grad_clip", 1.0, "Clip gradients to this global norm; 0 = off."),
    ("train.seed", 0, "Seed for init and data order: same seed and config, same run."),
    ("train.log_every", 10, "Steps between metrics records."),
    ("train.eval_every", 0, "Steps between validation evals; 0 = about 6 per run."),
    ("train.eval_tokens", 16384, "Validation tokens per periodic eval (the final eval uses all)."),
    ("train.checkpoint_every_s", 300.0, "Seconds between periodic checkpoints."),
    ("train.keep_checkpoints", 3, "Checkpoints kept in the run dir (oldest deleted first)."),
    ("train.run_dir", "", "Output folder; '' = runs/<timestamp> (runs/latest links to it)."),
    ("train.resume", "auto", "A run dir with checkpoints: auto = continue from the newest, never = refuse, or a step number."),
    ("train.init_from", "", "Start from a Hugging Face Llama: hf:FOLDER or hf:OWNER/NAME (its architecture and tokenizer; docs/export.md); '' = fresh weights."),
    # data
    ("data.corpus", "wiki", "Training text: wiki | shakespeare | kjv, files, folders, globs, hf:NAME; comma-separated."),
    ("data.val_source", "", "Held-out text (same syntax as corpus); '' = a split of the corpus."),
    ("data.val_fraction", 0.01, "Fraction of documents held out for validation."),
    ("data.val_min_tokens", 50_000, "Hold out at least about this many tokens (at 4 bytes/token) of documents, at most half the corpus; 0 = off."),
    ("data.vocab_size", 8192, "Vocabulary size of the byte-level BPE trained on the corpus."),
    ("data.tokenizer", "", "Path to a tokenizer.json to use instead of training one."),
    ("data.max_chars", 0, "Use only the first N characters of the corpus; 0 = all."),
    ("data.text_field", "text", "The jsonl field, parquet column or hf: dataset column that holds the text."),
    ("data.tokenizer_sample_bytes", 32_000_000, "Train the BPE on a deterministic sample of about this many bytes of training text; 0 = all of it. A hf: stream's held-out text comes from its head of this size."),
    ("data.scan_max_bytes", 128_000_000, "Local files bigger than this on disk are split and sampled from their head, as a hf: stream is, not scanned whole before training; 0 = always scan."),
    ("data.stream_min_bytes", 16_000_000, "A budgeted run on a corpus of at least this many bytes starts training while it is still tokenized; 0 = never."),
    ("data.stream_shard_tokens", 1_000_000, "Tokens of a shard of a stream tokenized while training: the unit that becomes visible, and what training waits for first."),
    ("data.stream_margin", 2.0, "Planned steps per shard = this x the steps the measured tokenizing rate needs for one; above 1 keeps data waits rare."),
    ("data.stream_steps_per_shard", 0.0, "Fix the stream schedule: shard i usable from step i x this (also in steps=N runs); 0 = from the measured rate (budgeted runs only)."),
    ("data.cache_dir", "", "Cache folder; '' = $PUFFERFISH_CACHE or ~/.cache/pufferfish."),
    # budget
    ("budget.time", "", "Wall-clock budget, e.g. 90s, 5m, 1h30m; '' = no budget (use train.steps)."),
    ("budget.planner", "measured", "measured: time models here, pick the lowest predicted loss; none: keep the configured model; seed: the white paper's tiers."),
    ("budget.tokens_per_param", 0.0, "If > 0: pick the largest model that gets this many tokens per non-embedding parameter."),
    ("budget.margin", 0.01, "Fraction of the budget kept in reserve for jitter; at least 0.5 s."),
    ("budget.max_epochs", 6.0, "A budgeted run stops after this many passes over the training text, decayed, even with time left (past it the held-out loss rose); 0 = no cap."),
    # moe (mixture of experts; off while num_experts is 0)
    ("moe.num_experts", 0, "Routed experts per MoE layer; 0 = no MoE (every FFN dense)."),
    ("moe.top_k", 2, "Routed experts each token uses."),
    ("moe.num_shared_experts", 1, "Experts every token uses, outside the router."),
    ("moe.layers", "all", "Blocks whose FFN is a MoE: all | after_first | every_other (blocks 1, 3, ...) | indices like 1,3."),
    ("moe.expert_hidden", 0, "Hidden width of each expert; 0 = model.ffn_hidden / (top_k + num_shared_experts) rounded up to 64."),
    ("moe.score", "sigmoid", "Router score: sigmoid (gates renormalised over the k, DeepSeek-V3) | softmax."),
    ("moe.balance", "loss_free", "Load balancing: loss_free (per-expert routing bias) | aux_loss (Switch-style loss) | none."),
    ("moe.bias_update_rate", 0.01, "loss_free: bias step per optimizer step, rate * sign(mean load - load)."),
    ("moe.aux_loss_weight", 0.01, "aux_loss: weight of the balance loss (per MoE layer)."),
    ("moe.router_z_loss_weight", 0.0, "Weight of the router z-loss (squared logsumexp of the logits); 0 = off."),
    ("moe.capacity_factor", 0.0, "Expert capacity as a multiple of an even share of the tokens; 0 = dropless."),
    ("moe.dispatch", "auto", "Expert dispatch: auto | dense (every expert on every token) | sorted (sort and gather)."),
    # mesh
    ("mesh.data", -1, "Data-parallel devices (batch split, params replicated); -1 = the devices left over."),
    ("mesh.fsdp", 1, "Fully sharded data-parallel devices (batch, params and optimizer state split); -1 = the rest."),
    ("mesh.tensor", 1, "Tensor-parallel devices (heads, FFN hidden, vocab split); -1 = the rest."),
    ("mesh.coordinator", "", "HOST:PORT of process 0 in a multi-host run; '' = from the environment (SLURM, TPU, MPI) or one process."),
    ("mesh.num_processes", 0, "Processes in a multi-host run; 0 = from the environment (1 without one)."),
    ("mesh.process_id", -1, "This process's index in a multi-host run; -1 = from the environment."),
    # pipeline (`python -m pipelines CONFIG.py`; training alone ignores these three sections)
    ("pipeline.stages", "corpus,tokenizer,tokens,plan,train,evaluate,sample,report",
     "Stages to run, comma-separated; the stages they need run too, and finished ones are skipped."),
    ("pipeline.run_dir", "", "Pipeline output folder; '' = runs/<config file name>."),
    ("eval.sets", "val", "Texts the evaluate stage scores, comma-separated SOURCE or NAME=SOURCE: val (the held-out split), wiki | shakespeare | kjv, a file, folder, glob or hf:NAME[:config][@split]."),
    ("eval.max_chars", 1_000_000, "Characters read from each eval set other than val (its first ones); 0 = all."),
    ("sample.prompts", "The history of|Once upon a time", "Prompts the sample stage continues, separated by |."),
    ("sample.max_new_tokens", SAMPLING.max_new_tokens, "Tokens sampled per prompt (at most model.seq_len minus the prompt)."),
    ("sample.min_new_tokens", SAMPLING.min_new_tokens, "The end-of-text token is not sampled before this many tokens."),
    ("sample.temperature", SAMPLING.temperature, "Sampling temperature; 0 = greedy."),
    ("sample.top_k", SAMPLING.top_k, "Sample among the k most likely tokens; 0 = all."),
    ("sample.top_p", SAMPLING.top_p, "Sample from the smallest set of tokens holding this probability; 1 = all."),
    ("sample.seed", SAMPLING.seed, "Sampling seed: same seed and checkpoint, same samples."),
)

HELP: dict[str, str] = {key: text for key, _, text in SCHEMA}
# Keys with a closed set of values. The model's live with the model (model/spec.py); the planner's
# names are the branches of budget/planner.py, listed here because the planner imports this module.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": spec_lib.DTYPES,
    "model.remat": spec_lib.REMAT_POLICIES,
    "model.attention": spec_lib.ATTENTION_BACKENDS,
    "model.mlp": spec_lib.MLP_KINDS,
    "train.optimizer": ("adamw", "muon"),
    "train.schedule": ("cosine", "wsd"),
    "budget.planner": ("measured", "none", "seed"),
    "moe.score": spec_lib.MOE_SCORES,
    "moe.balance": spec_lib.MOE_BALANCES,
    "moe.dispatch": spec_lib.MOE_DISPATCHES,
}
# Shortcuts accepted on the command line: `just train budget=5m steps=100 run_dir=out`.
ALIASES: dict[str, str] = {"budget": "budget.time", "steps": "train.steps", "run_dir": "train.run_dir",
                           "resume": "train.resume", "init_from": "train.init_from"}
MODEL_SHAPE_KEYS = ("model.num_layers", "model.d_model", "model.num_heads", "model.num_kv_heads",
                    "model.head_dim", "model.ffn_hidden")


def defaults() -> ml_collections.ConfigDict:
    """The default config, built from SCHEMA."""
    tree: dict[str, dict[str, Any]] = {}
    for key, value, _ in SCHEMA:
        section, name = key.split(".")
        tree.setdefault(section, {})[name] = value
    return ml_collections.ConfigDict(tree)


def flatten(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """{'model.d_model': 256, ...} in schema order."""
    return {key: cfg[key.split(".")[0]][key.split(".")[1]] for key, _, _ in SCHEMA}


def _closest(key: str) -> str:
    names = [k for k, _, _ in SCHEMA] + list(ALIASES)
    near = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
    if not near:  # 'num_layer' should still find 'model.num_layers'
        near = difflib.get_close_matches(key, [k.split(".")[1] for k in names if "." in k], n=3, cutoff=0.6)
        near = [k for k, _, _ in SCHEMA if k.split(".")[1] in near]
    return f" (did you mean {', '.join(near)}?)" if near else ""


def _coerce(key: str, raw: Any) -> Any:
    """Converts a value to the type of the key's default; strings come from the command line."""
    default = dict((k, v) for k, v, _ in SCHEMA)[key]
    try:
        if isinstance(raw, (dict, list, tuple)) or raw is None:  # from a JSON file: never a scalar's text
            raise ValueError
        if isinstance(default, bool):
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("1", "true", "yes", "on"):
                return True
            if str(raw).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            number = float(raw)  # accepts '2e3'; rejects '1.5'
            if not number.is_integer():
                raise ValueError
            return int(number)
        if isinstance(default, float):
            return float(raw)
        return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={raw!r}: expected {type(default).__name__}") from None


def _set(cfg: ml_collections.ConfigDict, key: str, raw: Any) -> None:
    key = ALIASES.get(key, key)
    if key not in HELP:
        raise ConfigError(f"unknown config key '{key}'{_closest(key)}")
    section, name = key.split(".")
    cfg[section][name] = _coerce(key, raw)


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Returns a copy of cfg with `key=value` strings applied (type-checked against the schema)."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        _set(cfg, key.strip(), raw.strip())
    return cfg


def from_dict(tree: dict[str, Any]) -> ml_collections.ConfigDict:
    """Defaults updated from a (possibly partial) nested dict; unknown keys are errors."""
    cfg = defaults()
    for section, values in tree.items():
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}' must be a mapping{_closest(section)}")
        for name, value in values.items():
            _set(cfg, f"{section}.{name}", value)
    return cfg


# Keys added after runs were saved without them, and the value that reproduces how those runs
# behaved: a saved config (run dir, checkpoint) that lacks one gets this, not today's default, so
# its data split, hence its tokenizer and token cache, stay the ones it was trained on, and a
# resumed run keeps the schedule it began with.
BEFORE_KEY_EXISTED: dict[str, Any] = {"data.val_min_tokens": 0, "data.tokenizer_sample_bytes": 0,
                                      "data.scan_max_bytes": 0, "train.schedule": "cosine",
                                      "train.optimizer": "adamw"}

# The peak AdamW rate that `train.lr=0` stands for, per optimizer: under Muon the AdamW group is
# only the embedding, head, norms and routers, which took twice the rate that is best for a whole
# model on AdamW (docs/recipe.md). One value per optimizer, so that `train.optimizer=adamw` alone
# gives back the measured AdamW recipe.
LR_BY_OPTIMIZER: dict[str, float] = {"adamw": 3e-3, "muon": 6e-3}


def peak_lr(train_cfg: ml_collections.ConfigDict) -> float:
    """The peak AdamW learning rate a run uses: train.lr, or its optimizer's default when it is 0."""
    return train_cfg.lr or LR_BY_OPTIMIZER[train_cfg.get("optimizer", "adamw")]


def from_saved(tree: dict[str, Any]) -> ml_collections.ConfigDict:
    """A config saved by a run (`to_json`): `from_dict`, with BEFORE_KEY_EXISTED for missing keys."""
    cfg = from_dict(tree)
    for key, value in BEFORE_KEY_EXISTED.items():
        section, name = key.split(".")
        if name not in tree.get(section, {}):
            cfg[section][name] = value
    return cfg


def load_file(path: str | Path) -> ml_collections.ConfigDict:
    """Loads `configs/X.py` (a `get_config()` returning a ConfigDict or dict) or a saved JSON."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.suffix == ".json":
        try:
            tree = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not UTF-8 text; it is not a saved config") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path} holds a JSON {type(tree).__name__}, not an object of config sections")
        return from_saved(tree)
    spec = importlib.util.spec_from_file_location(f"_pufferfish_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} has no get_config() function")
    got = module.get_config()
    return from_dict(got.to_dict() if isinstance(got, ml_collections.ConfigDict) else dict(got))


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks value ranges and combinations; returns cfg so calls chain. The model and moe sections
    are checked by building their spec, the one home of the model's rules."""
    flat = flatten(cfg)
    for key, choices in CHOICES.items():
        spec_lib.check_choice(key, flat[key], choices)
    for key, value in flat.items():  # NaN compares false with every bound below, so it is refused first
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value} must be a finite number")
    for key in ("train.lr", "train.beta1", "train.beta2", "train.weight_decay", "train.grad_clip",
                "train.checkpoint_every_s", "train.eval_every", "train.eval_tokens", "data.max_chars"):
        if flat[key] < 0:
            raise ConfigError(f"{key}={flat[key]} must be non-negative")
    for key in ("train.batch_size", "train.grad_accum", "train.log_every", "train.keep_checkpoints", "data.vocab_size"):
        if flat[key] <= 0:
            raise ConfigError(f"{key}={flat[key]} must be positive")
    model_cfg = ml_collections.ConfigDict(cfg.model.to_dict())
    model_cfg.vocab_size = model_cfg.vocab_size or 1  # 0 = the tokenizer's size, known once the data is ready
    ModelSpec.from_config(model_cfg, cfg.moe)
    if cfg.moe.num_experts < 0:
        raise ConfigError(f"moe.num_experts={cfg.moe.num_experts} must not be negative (0 = dense)")
    t = cfg.train
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.grad_accum={t.grad_accum} must divide train.batch_size={t.batch_size}")
    if cfg.data.val_min_tokens < 0:
        raise ConfigError(f"data.val_min_tokens={cfg.data.val_min_tokens} must not be negative (0 = no floor)")
    if cfg.data.stream_min_bytes < 0 or cfg.data.stream_shard_tokens < 2 or not cfg.data.stream_margin >= 1 \
            or cfg.data.stream_steps_per_shard < 0:
        raise ConfigError("data.stream_min_bytes and data.stream_steps_per_shard must not be negative, "
                          "data.stream_shard_tokens at least 2 and data.stream_margin at least 1")
    if cfg.data.tokenizer_sample_bytes < 0 or cfg.data.scan_max_bytes < 0 or not cfg.data.text_field:
        raise ConfigError("data.tokenizer_sample_bytes and data.scan_max_bytes must not be negative (0 = all, "
                          "always scan) and data.text_field not empty")
    if not 0 < cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must be between 0 and 1")
    if not 0 <= t.min_lr_ratio <= 1 or not 0 <= t.warmup_fraction < 1:
        raise ConfigError("train.min_lr_ratio must be in [0, 1] and train.warmup_fraction in [0, 1)")
    if t.init_from and not t.init_from.startswith("hf:"):
        raise ConfigError(f"train.init_from={t.init_from!r}: expected hf:FOLDER or hf:OWNER/NAME (a Hugging Face Llama)")
    if not 0 < t.warmdown_fraction <= 1:
        raise ConfigError(f"train.warmdown_fraction={t.warmdown_fraction} must be in (0, 1]")
    if t.muon_lr <= 0 or not 0 <= t.muon_beta < 1:
        raise ConfigError("train.muon_lr must be positive and train.muon_beta in [0, 1)")
    if t.resume not in ("auto", "never") and not t.resume.isdigit():
        raise ConfigError(f"train.resume={t.resume!r}: expected auto, never or a checkpoint step number")
    sizes = {f"mesh.{axis}": cfg.mesh[axis] for axis in ("data", "fsdp", "tensor")}
    if any(v == 0 or v < -1 for v in sizes.values()) or list(sizes.values()).count(-1) > 1:
        raise ConfigError(f"{', '.join(f'{k}={v}' for k, v in sizes.items())}: each mesh axis must be positive, "
                          "or -1 (the devices left over) on at most one axis")
    if cfg.mesh.num_processes < 0 or cfg.mesh.process_id < -1:
        raise ConfigError("mesh.num_processes must be >= 0 and mesh.process_id >= -1 (0 and -1 mean: from the environment)")
    if cfg.budget.max_epochs < 0:
        raise ConfigError(f"budget.max_epochs={cfg.budget.max_epochs} must not be negative (0 = no cap)")
    if cfg.budget.time:
        parse_duration(cfg.budget.time)
    elif t.steps <= 0:
        raise ConfigError("give a budget (budget=5m) or a number of steps (steps=200)")
    return cfg


def changed_keys(cfg: ml_collections.ConfigDict) -> list[str]:
    """The keys whose values differ from the defaults, in schema order."""
    flat, default = flatten(cfg), flatten(defaults())
    return [key for key in flat if flat[key] != default[key]]


def from_command_line(items: list[str]) -> tuple[ml_collections.ConfigDict, set[str]]:
    """`config=FILE` first, then `key=value` overrides in order; returns the validated config and
    the keys the user set (a config file's changed keys and every override), which the planner keeps."""
    files = [i.split("=", 1)[1] for i in items if i.startswith("config=")]
    overrides = [i for i in items if not i.startswith("config=")]
    cfg = load_file(files[-1]) if files else defaults()
    user_keys = set(changed_keys(cfg))
    cfg = apply_overrides(cfg, overrides)
    user_keys |= {ALIASES.get(k, k) for k in (o.split("=", 1)[0].strip() for o in overrides)}
    if cfg.budget.time and cfg.train.steps:
        raise ConfigError("give either a budget (budget=5m) or a number of steps (steps=N), not both")
    return validate(cfg), user_keys


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)([hms])")


def parse_duration(text: str) -> float:
    """'90s', '5m', '1.5h', '1h30m', '0.25h' -> seconds."""
    text = text.strip().lower()
    parts = _DURATION_RE.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ConfigError(f"budget '{text}' is not a duration like 90s, 5m, 1h30m or 1.5h")
    units = [u for _, u in parts]
    if len(set(units)) != len(units) or units != sorted(units, key="hms".index):
        raise ConfigError(f"budget '{text}' repeats or misorders units (write e.g. 1h30m)")
    seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    if seconds <= 0:
        raise ConfigError(f"budget '{text}' must be positive")
    return seconds


def cache_dir(cfg: ml_collections.ConfigDict) -> Path:
    """data.cache_dir, else $PUFFERFISH_CACHE, else ~/.cache/pufferfish."""
    path = cfg.data.cache_dir or os.environ.get("PUFFERFISH_CACHE") or "~/.cache/pufferfish"
    return Path(path).expanduser()


def to_json(cfg: ml_collections.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=False)

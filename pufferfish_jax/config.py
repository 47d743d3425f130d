"""The configuration schema: one table of (key, default, help) from which everything else derives.

A single schema keeps defaults, documentation (README, `--help`, the config editor) and validation
from drifting apart. Configs are ml_collections ConfigDicts with sections model, train, data and
budget; they are saved as JSON in every run dir and checkpoint, and loaded back through the same
validation, so a saved config can never smuggle in a key the code does not know.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import ml_collections

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
    ("model.attention", "auto", "Attention backend: auto | xla | blocked (causal query blocks, fast on CPU)."),
    ("model.init_std", 0.02, "Std of the normal initializer for weights."),
    # train
    ("train.steps", 0, "Optimizer steps; 0 = as many as the budget allows."),
    ("train.batch_size", 16, "Sequences per optimizer step (split over grad_accum micro-batches)."),
    ("train.grad_accum", 1, "Micro-batches accumulated per optimizer step."),
    ("train.lr", 3e-3, "Peak learning rate (AdamW)."),
    ("train.min_lr_ratio", 0.1, "Final learning rate as a fraction of the peak (cosine floor)."),
    ("train.warmup_fraction", 0.05, "Fraction of the steps spent warming the learning rate up."),
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
    # data
    ("data.corpus", "wiki", "Training text: wiki | shakespeare | kjv, files, folders, globs, hf:NAME; comma-separated."),
    ("data.val_source", "", "Held-out text (same syntax as corpus); '' = a split of the corpus."),
    ("data.val_fraction", 0.01, "Fraction of documents held out for validation."),
    ("data.vocab_size", 8192, "Vocabulary size of the byte-level BPE trained on the corpus."),
    ("data.tokenizer", "", "Path to a tokenizer.json to use instead of training one."),
    ("data.max_chars", 0, "Use only the first N characters of the corpus; 0 = all."),
    ("data.cache_dir", "", "Cache folder; '' = $PUFFERFISH_CACHE or ~/.cache/pufferfish."),
    # budget
    ("budget.time", "", "Wall-clock budget, e.g. 90s, 5m, 1h30m; '' = no budget (use train.steps)."),
    ("budget.planner", "measured", "measured: time models here, pick the lowest predicted loss; none: keep the configured model; seed: the white paper's tiers."),
    ("budget.tokens_per_param", 0.0, "If > 0: pick the largest model that gets this many tokens per non-embedding parameter."),
    ("budget.margin", 0.01, "Fraction of the budget kept in reserve for jitter."),
)

HELP: dict[str, str] = {key: text for key, _, text in SCHEMA}
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("bfloat16", "float32"),
    "model.remat": ("none", "full", "save_dots"),
    "model.attention": ("auto", "xla", "blocked"),
    "budget.planner": ("measured", "none", "seed"),
}
# Shortcuts accepted on the command line: `just train budget=5m steps=100 run_dir=out`.
ALIASES: dict[str, str] = {"budget": "budget.time", "steps": "train.steps", "run_dir": "train.run_dir",
                           "resume": "train.resume"}
MODEL_SHAPE_KEYS = ("model.num_layers", "model.d_model", "model.num_heads", "model.num_kv_heads",
                    "model.head_dim", "model.ffn_hidden")


class ConfigError(ValueError):
    """A user mistake in a config file, an override or a saved config; the message is one line."""


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
        return from_dict(tree)
    spec = importlib.util.spec_from_file_location(f"_pufferfish_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} has no get_config() function")
    got = module.get_config()
    return from_dict(got.to_dict() if isinstance(got, ml_collections.ConfigDict) else dict(got))


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks value ranges and combinations; returns cfg so calls chain."""
    flat = flatten(cfg)
    for key, choices in CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"{key}={flat[key]!r}: expected one of {' | '.join(choices)}")
    positive = ("model.num_layers", "model.d_model", "model.num_heads", "model.num_kv_heads",
                "model.seq_len", "train.batch_size", "train.grad_accum", "train.log_every",
                "train.keep_checkpoints", "data.vocab_size")
    for key in positive:
        if flat[key] <= 0:
            raise ConfigError(f"{key}={flat[key]} must be positive")
    m = cfg.model
    if m.head_dim == 0 and m.d_model % m.num_heads:
        raise ConfigError(f"model.num_heads={m.num_heads} must divide model.d_model={m.d_model} (or set model.head_dim)")
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads}")
    if (m.head_dim or m.d_model // m.num_heads) % 2:
        raise ConfigError("the head dimension must be even for RoPE (adjust model.d_model, num_heads or head_dim)")
    t = cfg.train
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.grad_accum={t.grad_accum} must divide train.batch_size={t.batch_size}")
    if not 0 < cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must be between 0 and 1")
    if not 0 <= t.min_lr_ratio <= 1 or not 0 <= t.warmup_fraction < 1:
        raise ConfigError("train.min_lr_ratio must be in [0, 1] and train.warmup_fraction in [0, 1)")
    if t.resume not in ("auto", "never") and not t.resume.isdigit():
        raise ConfigError(f"train.resume={t.resume!r}: expected auto, never or a checkpoint step number")
    if cfg.budget.time:
        parse_duration(cfg.budget.time)
    elif t.steps <= 0:
        raise ConfigError("give a budget (budget=5m) or a number of steps (steps=200)")
    return cfg


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

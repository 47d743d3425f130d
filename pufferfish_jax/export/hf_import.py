"""`train.init_from=hf:PATH_OR_NAME`: a run that starts from a Hugging Face Llama checkpoint.

The architecture comes from its config.json (llama_map.model_keys, which refuses what we cannot
represent), the tokenizer is its own tokenizer.json, and the model's shape keys join the user's
keys, so the planner treats the shape as fixed and only fits the steps (and batch) to the budget.
The weights replace the fresh initialisation once the run's state exists (session.train).
A hub name (owner/name) is downloaded into the cache when this machine is online.
"""

from __future__ import annotations

import re
from pathlib import Path

import ml_collections

from pufferfish_jax import config as config_lib
from pufferfish_jax.data.files import Log, no_log
from pufferfish_jax.errors import ConfigError
from pufferfish_jax.export import hf_folder, llama_map
from pufferfish_jax.model.spec import ModelSpec

PREFIX = "hf:"
HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")
HUB_FILES = ["config.json", "*.safetensors", hf_folder.INDEX, "tokenizer.json", "tokenizer_config.json",
             "generation_config.json", "special_tokens_map.json"]
# Model keys the user may set beside init_from: how long the windows are and how we compute.
FREE_MODEL_KEYS = ("model.seq_len", "model.dtype", "model.remat", "model.attention", "model.init_std")


def source_folder(init_from: str, cache_dir: Path, log: Log = no_log) -> Path:
    """The local folder of `hf:PATH_OR_NAME`: PATH itself, or the hub snapshot of NAME."""
    if not init_from.startswith(PREFIX):
        raise ConfigError(f"train.init_from={init_from!r}: expected hf:PATH or hf:OWNER/NAME (a Hugging Face Llama)")
    source = init_from[len(PREFIX):]
    path = Path(source).expanduser()
    if path.exists():
        return path
    if not HUB_NAME.match(source):
        raise ConfigError(f"train.init_from: no such folder {path}")
    try:
        from huggingface_hub import snapshot_download

        log(f"init_from: downloading {source} from the Hugging Face hub")
        return Path(snapshot_download(source, allow_patterns=HUB_FILES, cache_dir=str(cache_dir / "hf")))
    except Exception as e:  # offline, unknown repo, gated model: the hub raises many kinds
        raise ConfigError(f"train.init_from: cannot fetch {source} from the Hugging Face hub "
                          f"({type(e).__name__}); give a local folder instead") from None


def configure(cfg: ml_collections.ConfigDict, user_keys: set[str], log: Log = no_log) -> Path:
    """Writes the checkpoint's architecture and tokenizer into `cfg` and their keys into
    `user_keys` (both in place); returns the folder. Idempotent: a second call changes nothing.
    A key the user set to something else than the checkpoint's is refused by name."""
    folder = source_folder(cfg.train.init_from, config_lib.cache_dir(cfg), log)
    config = hf_folder.read_config(folder)
    if cfg.moe.num_experts:
        raise ConfigError("train.init_from: a Llama checkpoint has no experts; set moe.num_experts=0")
    wanted = llama_map.model_keys(config)
    wanted["data.tokenizer"] = str(folder / "tokenizer.json")
    if "model.seq_len" in user_keys:
        del wanted["model.seq_len"]
    for key, value in wanted.items():
        section, name = key.split(".")
        if key in user_keys and cfg[section][name] != value:
            raise ConfigError(f"{key}={cfg[section][name]!r} conflicts with init_from's {value!r}; leave {key} out "
                              f"(only {', '.join(FREE_MODEL_KEYS)} may be set beside init_from)")
        cfg[section][name] = value
    user_keys |= set(wanted)
    config_lib.validate(cfg)
    log(f"init_from: {folder}: {wanted['model.num_layers']} layers, d {wanted['model.d_model']}, "
        f"vocab {wanted['model.vocab_size']:,}")
    return folder


def initial_params(cfg: ml_collections.ConfigDict) -> dict:
    """The checkpoint's weights as our float32 parameter tree for the run's (resolved) config."""
    spec = ModelSpec.from_config(cfg.model, cfg.moe)
    folder = source_folder(cfg.train.init_from, config_lib.cache_dir(cfg))
    return llama_map.from_hf_tensors(hf_folder.read_folder(folder).tensors, spec)

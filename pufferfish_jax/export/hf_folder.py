"""A Hugging Face model folder on disk: written for `AutoModelForCausalLM` / `AutoTokenizer`
(config.json, generation_config.json, model.safetensors or shards with an index, tokenizer.json,
tokenizer_config.json), and read back. numpy and safetensors only: no torch, no transformers.

Everything is written deterministically (sorted JSON, tensors in a fixed order, no timestamps or
library versions), so exporting the same weights twice gives the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

from pufferfish_jax.errors import ExportError

MAX_SHARD_BYTES = 2 * 2**30  # transformers' convention: one file up to this, shards with an index past it
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
INDEX = "model.safetensors.index.json"
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|im_start|>")  # what tokenizers call the start token
# What an export writes; a folder holding anything else is not overwritten.
EXPORT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", INDEX)


@dataclass(frozen=True)
class HFFolder:
    """A Llama checkpoint folder as read: its config.json, every tensor, and its tokenizer.json."""

    config: dict
    tensors: dict[str, np.ndarray]
    tokenizer_path: Path


def _json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def special_tokens(tok: Tokenizer, eos_id: int) -> tuple[int, str, str]:
    """(bos id, bos token, eos token): the start token is the tokenizer's own if it has one, else
    the end-of-text token, which is what precedes every document in our token streams."""
    bos_id = next((i for name in BOS_NAMES if (i := tok.token_to_id(name)) is not None), eos_id)
    return bos_id, tok.id_to_token(bos_id), tok.id_to_token(eos_id)


def tokenizer_config(tok: Tokenizer, eos_id: int, model_max_length: int) -> dict:
    """tokenizer_config.json for the fast tokenizer class: special tokens named, no token added
    on encode (our prompts and training text carry none), so `AutoTokenizer` encodes as we do."""
    _, bos, eos = special_tokens(tok, eos_id)
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "unk_token": eos,
            "pad_token": eos, "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length}


def prepare_out_dir(out: Path) -> None:
    """Creates `out`, or empties a previous export in it; a folder holding other files is refused."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; give a folder to export into")
    if out.is_dir():
        ours = [p for p in out.iterdir() if p.name in EXPORT_FILES or (p.name.startswith("model") and p.suffix == ".safetensors")]
        others = sorted(p.name for p in out.iterdir() if p not in ours)
        if others:
            raise ExportError(f"{out} holds files an export does not write ({', '.join(others[:3])}); choose an empty "
                              "or new folder")
        for path in ours:
            path.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create {out} ({e.strerror}); choose another folder") from None


def shard_groups(tensors: dict[str, np.ndarray], max_bytes: int) -> list[list[str]]:
    """Tensor names in order, cut into files of at most `max_bytes` (a bigger tensor alone)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, array in tensors.items():
        if groups[-1] and size + array.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += array.nbytes
    return groups


def write_weights(out: Path, tensors: dict[str, np.ndarray], max_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors plus the index past `max_bytes`;
    returns the file names written."""
    groups = shard_groups(tensors, max_bytes)
    if len(groups) == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    files, weight_map = [], {}
    for i, names in enumerate(groups, 1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(out / file), metadata={"format": "pt"})
        weight_map |= {n: file for n in names}
        files.append(file)
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
    (out / INDEX).write_text(_json(index))
    return files + [INDEX]


def write_folder(out: Path, *, config: dict, tensors: dict[str, np.ndarray], tok: Tokenizer, eos_id: int,
                 dtype: str, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """The whole folder, the tensors cast to `dtype`; returns the file names written."""
    prepare_out_dir(out)
    cast = {name: np.ascontiguousarray(a.astype(DTYPES[dtype])) for name, a in tensors.items()}
    files = write_weights(out, cast, max_shard_bytes)
    bos_id, bos, eos = special_tokens(tok, eos_id)
    generation = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}
    documents = {"config.json": config, "generation_config.json": generation,
                 "tokenizer_config.json": tokenizer_config(tok, eos_id, config["max_position_embeddings"]),
                 "special_tokens_map.json": {"bos_token": bos, "eos_token": eos, "unk_token": eos, "pad_token": eos}}
    for name, document in documents.items():
        (out / name).write_text(_json(document))
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True))
    return files + list(documents) + ["tokenizer.json"]


def read_config(path: Path) -> dict:
    """config.json of a model folder that also has the tokenizer.json an import needs."""
    if not (path / "config.json").is_file():
        raise ExportError(f"init_from: {path} has no config.json; give a Hugging Face model folder")
    if not (path / "tokenizer.json").is_file():
        raise ExportError(f"init_from: {path} has no tokenizer.json (the fast tokenizer); only models that ship one "
                          "can be imported")
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"init_from: {path / 'config.json'} is not valid JSON ({e.msg})") from None


def read_folder(path: Path) -> HFFolder:
    """config.json, every tensor (one file or the shards an index names) and the tokenizer path."""
    config = read_config(path)
    if (path / INDEX).is_file():
        files = sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ExportError(f"init_from: {path} has no model.safetensors or {INDEX} (only safetensors weights are read)")
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        tensors |= load_file(str(path / file))
    return HFFolder(config, tensors, path / "tokenizer.json")

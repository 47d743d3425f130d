"""`export`: a model and its tokenizer written as a Hugging Face Llama folder or a GGUF file."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from pufferfish_jax.data.tokenizer import eos_id
from pufferfish_jax.errors import ExportError
from pufferfish_jax.export import gguf_file, hf_folder, llama_map
from pufferfish_jax.model.spec import ModelSpec

FORMATS = ("hf", "gguf")
DTYPES = tuple(hf_folder.DTYPES)


def gguf_path(out: Path) -> Path:
    """OUT itself when it names a .gguf file, else OUT/model.gguf."""
    return out if out.suffix == ".gguf" else out / "model.gguf"


def export_model(spec: ModelSpec, params: dict, tok: Tokenizer, out: Path, *, fmt: str = "hf",
                 dtype: str = "float32", name: str = "pufferfish", max_shard_bytes: int = hf_folder.MAX_SHARD_BYTES) -> list[Path]:
    """Writes the model; returns the paths written. Refuses, in one line, a model the format
    cannot express (llama_map.check_exportable) before writing anything."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: expected one of {' | '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: expected one of {' | '.join(DTYPES)}")
    if tok.get_vocab_size() > spec.vocab_size:
        raise ExportError(f"the tokenizer has {tok.get_vocab_size()} tokens, more than the model's {spec.vocab_size} rows")
    eos = eos_id(tok)
    tensors = llama_map.to_hf_tensors(params, spec)  # refuses first
    if fmt == "gguf":
        path = gguf_path(out)
        if path.exists() and path.is_dir():
            raise ExportError(f"{path} is a folder; give a .gguf file name or a folder to write model.gguf into")
        path.parent.mkdir(parents=True, exist_ok=True)
        gguf_file.write_gguf(path, spec=spec, tensors=tensors, tok=tok, eos_id=eos, dtype=dtype, name=name)
        return [path]
    bos_id, _, _ = hf_folder.special_tokens(tok, eos)
    config = llama_map.hf_config(spec, bos_id=bos_id, eos_id=eos, dtype=dtype)
    files = hf_folder.write_folder(out, config=config, tensors=tensors, tok=tok, eos_id=eos, dtype=dtype,
                                   max_shard_bytes=max_shard_bytes)
    return [out / f for f in files]

"""A GGUF file for llama.cpp (and what runs on it: Ollama, LM Studio), through the `gguf` package.

Metadata keys and tensor names are llama.cpp's for the `llama` architecture (token_embd,
blk.N.attn_q, ..., output_norm, output); tensors keep HF's [out, in] numpy layout, which GGUF
stores with its dimensions reversed. One difference from the HF layout: llama.cpp's `llama`
RoPE rotates adjacent pairs (2i, 2i + 1), ours and HF's rotate (i, i + H/2), so the rows of each
q and k head are interleaved (`interleave_rope_rows`). Norms stay float32 whatever `dtype`.
The tokenizer goes in as a byte-level BPE ("gpt2"): tokens, their types, merges and the special ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from tokenizers import Tokenizer

from pufferfish_jax.errors import ExportError
from pufferfish_jax.export.hf_folder import special_tokens
from pufferfish_jax.model.spec import ModelSpec

FILE_TYPES = {"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
              "bfloat16": gguf.LlamaFileType.MOSTLY_BF16}
_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name for an HF Llama tensor: model.layers.3.mlp.up_proj.weight -> blk.3.ffn_up.weight."""
    if hf_name in _TOP:
        return _TOP[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_LAYER[rest.removesuffix('.weight')]}.weight"


def interleave_rope_rows(w_RD: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head reordered from halves (x_0..x_{H/2-1}, y_0..) to pairs (x_0, y_0, x_1, ...)."""
    rows, D = w_RD.shape
    return w_RD.reshape(heads, 2, rows // heads // 2, D).swapaxes(1, 2).reshape(rows, D)


def _tokenizer_metadata(writer: gguf.GGUFWriter, tok: Tokenizer, eos_id: int, vocab_size: int) -> None:
    spec = json.loads(tok.to_str())
    pre = spec.get("pre_tokenizer") or {}
    if spec["model"]["type"] != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) \
            or spec.get("normalizer"):
        kind = f"{spec['model']['type']} with pre-tokenizer {pre.get('type')} and normalizer {(spec.get('normalizer') or {}).get('type')}"
        raise ExportError(f"GGUF export writes GPT-2 style byte-level BPE tokenizers (what we train); this one is {kind}, "
                          "which llama.cpp would split differently: export --format hf instead")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # the rows past the tokenizer's size are padding
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in spec["model"]["vocab"].items():
        if i < vocab_size:
            tokens[i], types[i] = token, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    bos_id, _, _ = special_tokens(tok, eos_id)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(bos_id)
    writer.add_eos_token_id(eos_id)
    writer.add_pad_token_id(eos_id)
    writer.add_add_bos_token(False)


def write_gguf(path: Path, *, spec: ModelSpec, tensors: dict[str, np.ndarray], tok: Tokenizer, eos_id: int,
               dtype: str, name: str) -> None:
    """`tensors` are HF-named float32 arrays (llama_map.to_hf_tensors)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(spec.seq_len)
    writer.add_embedding_length(spec.d_model)
    writer.add_block_count(spec.num_layers)
    writer.add_feed_forward_length(spec.ffn_hidden)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(spec.norm_eps)
    writer.add_vocab_size(spec.vocab_size)
    writer.add_file_type(FILE_TYPES[dtype])
    _tokenizer_metadata(writer, tok, eos_id, spec.vocab_size)
    for hf_name, array in tensors.items():
        if hf_name.endswith("q_proj.weight"):
            array = interleave_rope_rows(array, spec.num_heads)
        elif hf_name.endswith("k_proj.weight"):
            array = interleave_rope_rows(array, spec.num_kv_heads)
        array = np.ascontiguousarray(array, np.float32)
        if array.ndim == 1 or dtype == "float32":
            writer.add_tensor(gguf_name(hf_name), array)
        elif dtype == "float16":
            writer.add_tensor(gguf_name(hf_name), array.astype(np.float16))
        else:
            quant = gguf.GGMLQuantizationType.BF16
            writer.add_tensor(gguf_name(hf_name), gguf.quants.quantize(array, quant), raw_dtype=quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

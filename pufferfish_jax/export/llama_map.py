"""The one map between our model and Hugging Face's `LlamaForCausalLM`: config fields, tensor names
and layouts, and what has no equivalent there (refused, by name). Export, import and GGUF all go
through here, so a new model option is mapped or refused in one place.

Conventions checked against ours (model/layers.py, attention.py, transformer.py), each identical:
- RoPE rotates the pairs (i, i + H/2) of each head ("rotate half"), with inv_freq_i =
  theta^(-2i/H): Hugging Face's layout too, so q/k need no permutation (GGUF does: gguf_file.py).
- RMSNorm is x * rsqrt(mean(x^2) + eps) * w, statistics in float32, weight w (not 1 + w).
- SwiGLU is down(silu(gate(x)) * up(x)); no biases anywhere.
- GQA: query head n reads kv head n // (N / K), as HF's `repeat_kv`.
- Attention scores are scaled by head_dim^-0.5; no embedding scale, no logit scale or soft-cap.
- The LM head is the embedding (tied) or its own [D, V] matrix, stored transposed by HF.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from pufferfish_jax.errors import ExportError
from pufferfish_jax.model.spec import ModelSpec

# ModelSpec fields that say how we compute or train, never what the model computes.
COMPUTE_ONLY = ("dtype", "remat", "attention", "init_std", "zero_init_out")
# ModelSpec fields this map writes into config.json and reads back from it.
MAPPED = ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "ffn_hidden", "seq_len",
          "rope_theta", "norm_eps", "tie_embeddings")
# The context an import gets when its config.json allows more and the user sets no model.seq_len:
# public models declare up to 128k positions, far beyond what a budgeted run trains on.
MAX_IMPORTED_CONTEXT = 2048
# Tensors an HF checkpoint may hold that compute nothing (old Llama checkpoints saved RoPE's table).
IGNORED_TENSOR_SUFFIXES = (".rotary_emb.inv_freq",)


def check_exportable(spec: ModelSpec) -> None:
    """Refuses, naming it, whatever `LlamaForCausalLM` cannot express.

    Every spec field is either mapped, compute-only, or must hold its default (the value that
    computes what Llama computes): an option added to ModelSpec later is refused here, by name,
    until it is mapped above.
    """
    if spec.moe is not None:
        raise ExportError(f"a MoE checkpoint cannot be exported: no standard Hugging Face class matches its "
                          f"{spec.moe.num_shared_experts} shared expert(s) beside {spec.moe.num_experts} "
                          f"{spec.moe.score}-scored routed ones (with learned routing biases); export a dense model")
    for field in dataclasses.fields(spec):
        if field.name in COMPUTE_ONLY + MAPPED + ("moe",):
            continue
        value = getattr(spec, field.name)
        if field.default is dataclasses.MISSING or value != field.default:
            raise ExportError(f"model.{field.name}={value!r} has no equivalent in Hugging Face's LlamaForCausalLM; "
                              f"this checkpoint cannot be exported")


def hf_config(spec: ModelSpec, *, bos_id: int, eos_id: int, dtype: str) -> dict[str, Any]:
    """config.json for `LlamaForCausalLM`: the legacy `rope_theta`/`rope_scaling` keys, which both
    transformers 4 and 5 read."""
    check_exportable(spec)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.d_model,
        "intermediate_size": spec.ffn_hidden,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.seq_len,
        "rms_norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": spec.tie_embeddings,
        "initializer_range": spec.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": dtype,
        "use_cache": True,
    }


def _refuse(key: str, value: Any, why: str) -> ExportError:
    return ExportError(f"init_from: config.json has {key}={value!r}, which we cannot represent ({why})")


def _rope_theta(config: dict) -> float:
    """rope_theta from the legacy keys or transformers 5's `rope_parameters`; any scaling refused."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    for key, block in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = block.get("rope_type", block.get("type", "default"))
        if kind != "default":
            raise _refuse(f"{key}.rope_type", kind, "we have plain RoPE only, no scaled or extended variants")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise _refuse("partial_rotary_factor", config["partial_rotary_factor"], "we rotate every head dimension")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def model_keys(config: dict) -> dict[str, Any]:
    """Our `model.*` config keys from an HF Llama config.json; a key that changes what the model
    computes and that we lack is refused by name. Keys transformers' Llama ignores are ignored
    (dropout: we train without it). seq_len is min(max_position_embeddings, MAX_IMPORTED_CONTEXT)."""
    if config.get("model_type") != "llama":
        raise _refuse("model_type", config.get("model_type"), "only Llama checkpoints map onto our model")
    if config.get("hidden_act", "silu") != "silu":
        raise _refuse("hidden_act", config["hidden_act"], "our MLP is SwiGLU with SiLU")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key, False):
            raise _refuse(key, config[key], "our projections have no biases")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(config.get(key), int) or config[key] <= 0:
            raise ExportError(f"init_from: config.json has no positive integer {key}; is it a Llama checkpoint?")
    heads = config["num_attention_heads"]
    return {
        "model.vocab_size": config["vocab_size"],
        "model.num_layers": config["num_hidden_layers"],
        "model.d_model": config["hidden_size"],
        "model.num_heads": heads,
        "model.num_kv_heads": config.get("num_key_value_heads") or heads,
        "model.head_dim": config.get("head_dim") or config["hidden_size"] // heads,
        "model.ffn_hidden": config["intermediate_size"],
        "model.seq_len": min(int(config.get("max_position_embeddings", 2048)), MAX_IMPORTED_CONTEXT),
        "model.rope_theta": _rope_theta(config),
        "model.norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "model.tie_embeddings": bool(config.get("tie_word_embeddings", False)),
    }


def _layer_names(i: int) -> dict[tuple[str, ...], str]:
    p = f"model.layers.{i}"
    return {
        (f"block_{i}", "attn_norm", "scale"): f"{p}.input_layernorm.weight",
        (f"block_{i}", "attn", "w_q"): f"{p}.self_attn.q_proj.weight",
        (f"block_{i}", "attn", "w_k"): f"{p}.self_attn.k_proj.weight",
        (f"block_{i}", "attn", "w_v"): f"{p}.self_attn.v_proj.weight",
        (f"block_{i}", "attn", "w_o"): f"{p}.self_attn.o_proj.weight",
        (f"block_{i}", "mlp_norm", "scale"): f"{p}.post_attention_layernorm.weight",
        (f"block_{i}", "mlp", "w_gate"): f"{p}.mlp.gate_proj.weight",
        (f"block_{i}", "mlp", "w_up"): f"{p}.mlp.up_proj.weight",
        (f"block_{i}", "mlp", "w_down"): f"{p}.mlp.down_proj.weight",
    }


def tensor_names(spec: ModelSpec) -> dict[tuple[str, ...], str]:
    """Our parameter path -> HF tensor name, in HF's order (embedding, layers, norm, head)."""
    names = {("embed", "embedding"): "model.embed_tokens.weight"}
    for i in range(spec.num_layers):
        names |= _layer_names(i)
    names[("final_norm", "scale")] = "model.norm.weight"
    if not spec.tie_embeddings:
        names[("lm_head",)] = "lm_head.weight"
    return names


def _to_hf_layout(path: tuple[str, ...], w: np.ndarray) -> np.ndarray:
    """Our array -> HF's [out_features, in_features] (norms and the embedding are the same)."""
    name = path[-1]
    if name in ("w_q", "w_k", "w_v"):  # [D, heads, H] -> [heads * H, D]
        return w.reshape(w.shape[0], -1).T
    if name == "w_o":  # [N, H, D] -> [D, N * H]
        return w.reshape(-1, w.shape[-1]).T
    if name in ("w_gate", "w_up", "w_down", "lm_head"):
        return w.T
    return w


def _our_shape(spec: ModelSpec, path: tuple[str, ...]) -> tuple[int, ...]:
    D, N, K, H, F, V = spec.d_model, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.ffn_hidden, spec.vocab_size
    return {"embedding": (V, D), "scale": (D,), "w_q": (D, N, H), "w_k": (D, K, H), "w_v": (D, K, H),
            "w_o": (N, H, D), "w_gate": (D, F), "w_up": (D, F), "w_down": (F, D), "lm_head": (D, V)}[path[-1]]


def to_hf_tensors(params: dict, spec: ModelSpec) -> dict[str, np.ndarray]:
    """Our (float32) parameter tree as HF-named, HF-laid-out, contiguous float32 arrays."""
    check_exportable(spec)
    out = {}
    for path, name in tensor_names(spec).items():
        leaf = params
        for key in path:
            leaf = leaf[key]
        out[name] = np.ascontiguousarray(_to_hf_layout(path, np.asarray(leaf, np.float32)))
    return out


def from_hf_tensors(tensors: dict[str, np.ndarray], spec: ModelSpec) -> dict:
    """HF-named tensors -> our float32 parameter tree for `spec`; a missing, misshapen or unknown
    tensor is refused by name. A tied model's checkpoint may carry a copy of the head: ignored."""
    names = tensor_names(spec)
    known = set(names.values()) | ({"lm_head.weight"} if spec.tie_embeddings else set())
    for name in tensors:
        if name not in known and not name.endswith(IGNORED_TENSOR_SUFFIXES):
            raise ExportError(f"init_from: the checkpoint has a tensor {name} that a Llama with this config.json "
                              "does not have; we cannot represent it")
    params: dict = {}
    for path, name in names.items():
        if name not in tensors:
            raise ExportError(f"init_from: the checkpoint lacks the tensor {name}")
        shape = _our_shape(spec, path)
        hf_shape = _to_hf_layout(path, np.zeros(shape, np.float32)).shape
        array = np.asarray(tensors[name])
        if array.shape != hf_shape:
            raise ExportError(f"init_from: tensor {name} is {list(array.shape)}, config.json implies {list(hf_shape)}")
        ours = _from_hf_layout(path, array.astype(np.float32), shape)
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.ascontiguousarray(ours)
    return params


def _from_hf_layout(path: tuple[str, ...], w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of `_to_hf_layout`."""
    if path[-1] in ("w_q", "w_k", "w_v", "w_o", "w_gate", "w_up", "w_down", "lm_head"):
        return w.T.reshape(shape)
    return w.reshape(shape)

"""Peak training memory per device, predicted from the shape before anything is compiled: the
planner keeps every candidate it considers within the device's memory, and a steps= run whose
fixed shape cannot fit is refused before anything is allocated. Once a shape is measured, the
compiled step's own memory analysis replaces this figure (`calibrate.Measurement.memory_bytes`)."""

from __future__ import annotations

import math

from pufferfish_jax.model.moe import resolve_dispatch
from pufferfish_jax.model.spec import ModelSpec
from pufferfish_jax.model.transformer import count_params


def _ffn_activation_width(spec: ModelSpec, layer: int) -> int:
    """FFN hidden units held per token: a MoE block keeps every expert's (dense dispatch) or the
    routed ones' times the capacity factor (sorted), plus the shared experts'."""
    if not spec.is_moe(layer):
        return spec.ffn_hidden
    m = spec.moe
    routed = m.num_experts if resolve_dispatch(m) == "dense" else m.top_k * max(m.capacity_factor, 1.0)
    return math.ceil((routed + m.num_shared_experts) * m.expert_hidden + m.num_experts)


def memory_bytes(spec: ModelSpec, batch_size: int, grad_accum: int, mesh: tuple[int, int, int] = (1, 1, 1)) -> int:
    """Peak training memory per device: float32 params, grads and two Adam moments (every expert of
    a MoE model, not only the active ones), plus activations.

    Activations per layer and token: about 16 residual-width tensors and 3 FFN-width ones in the
    compute dtype, the attention probabilities (heads x context, float32), and the float32 logits;
    full remat keeps only each block's input. On a (data, fsdp, tensor) mesh the state is split
    over fsdp x tensor, the tokens over data x fsdp, and the FFN, attention and logit widths over
    tensor (the residual stream is whole on every tensor device).
    """
    data, fsdp, tensor = mesh
    itemsize = 2 if spec.dtype == "bfloat16" else 4
    tokens = batch_size // grad_accum * spec.seq_len / (data * fsdp)
    if spec.remat == "full":
        activations = spec.num_layers * tokens * itemsize * spec.d_model
    else:
        activations = sum(tokens * (itemsize * (16 * spec.d_model + 3 * _ffn_activation_width(spec, i) / tensor)
                                    + 4 * spec.num_heads * spec.seq_len / tensor) for i in range(spec.num_layers))
    logits = tokens * spec.vocab_size * 4 * 3 / tensor
    return int(16 * count_params(spec) / (fsdp * tensor) + activations + logits)

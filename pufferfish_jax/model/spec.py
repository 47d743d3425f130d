"""What a model is, resolved from the config: `ModelSpec`, `MoESpec` and the values their fields allow.

This is the one home of the allowed values (dtypes, remat policies, attention backends, MoE
settings) and of the model's validity rules. `config.validate` builds a spec to check a config, so a
mistake is found before any data is prepared, and the model code can rely on a spec being valid.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from pufferfish_jax.errors import ConfigError

DTYPES = ("bfloat16", "float32")  # the compute dtype; params and optimizer state are always float32
# 'none' leaves a block alone; the others wrap it in jax.checkpoint (transformer.REMAT_POLICIES).
REMAT_POLICIES = ("none", "full", "save_dots")
ATTENTION_BACKENDS = ("auto", "xla", "blocked", "cudnn", "pallas", "splash")
MOE_SCORES = ("sigmoid", "softmax")
MOE_BALANCES = ("loss_free", "aux_loss", "none")
MOE_DISPATCHES = ("auto", "dense", "sorted")
MLP_KINDS = ("swiglu", "relu2")  # the dense blocks' FFN; relu2 = down(relu(x @ up)^2) at the same parameter count


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> str:
    """The one "expected one of" check; returns the value so calls chain."""
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: expected one of {' | '.join(choices)}")
    return value


def moe_layer_indices(pattern: str, num_layers: int) -> tuple[int, ...]:
    """The blocks a moe.layers pattern selects in a num_layers-deep model.

    Named patterns follow the depth (the planner may choose it); explicit indices must exist.
    """
    pattern = pattern.strip()
    named = {"all": range(num_layers), "after_first": range(1, num_layers), "every_other": range(1, num_layers, 2)}
    if pattern in named:
        return tuple(named[pattern])
    try:
        indices = sorted({int(part) for part in pattern.split(",")})
    except ValueError:
        raise ConfigError(f"moe.layers={pattern!r}: expected all, after_first, every_other or block indices like 1,3") from None
    if indices[0] < 0 or indices[-1] >= num_layers:
        raise ConfigError(f"moe.layers={pattern!r} names a block outside the model's {num_layers} (0 to {num_layers - 1})")
    return tuple(indices)


@dataclasses.dataclass(frozen=True)
class MoESpec:
    """The resolved `moe` config section; frozen and hashable like the ModelSpec that holds it."""

    num_experts: int
    top_k: int
    num_shared_experts: int
    layers: tuple[int, ...]  # indices of the blocks whose FFN is a MoE
    expert_hidden: int
    score: str = "sigmoid"
    balance: str = "loss_free"
    bias_update_rate: float = 0.01
    aux_loss_weight: float = 0.01
    router_z_loss_weight: float = 0.0
    capacity_factor: float = 0.0  # 0 = dropless
    dispatch: str = "auto"

    def __post_init__(self):
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"moe.top_k={self.top_k} must be between 1 and moe.num_experts={self.num_experts}")
        if not self.layers:
            raise ConfigError("moe.layers selects no block; use all, or set moe.num_experts=0 for a dense model")
        for name in ("num_shared_experts", "bias_update_rate", "aux_loss_weight", "router_z_loss_weight",
                     "capacity_factor"):
            if getattr(self, name) < 0:
                raise ConfigError(f"moe.{name}={getattr(self, name)} must not be negative")
        if self.expert_hidden <= 0:
            raise ConfigError(f"moe.expert_hidden={self.expert_hidden} must be positive (or 0 in the config: derived)")
        check_choice("moe.score", self.score, MOE_SCORES)
        check_choice("moe.balance", self.balance, MOE_BALANCES)
        check_choice("moe.dispatch", self.dispatch, MOE_DISPATCHES)

    def capacity(self, num_tokens: int) -> int:
        """Slots per expert for `num_tokens` tokens; an expert never gets more than one
        assignment per token, so num_tokens slots mean nothing is dropped."""
        if self.capacity_factor == 0:
            return num_tokens
        return min(num_tokens, max(1, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The model config with derived sizes resolved; frozen and hashable, so it can be a static jit arg."""

    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden: int
    seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dtype: str = "float32"
    remat: str = "none"
    attention: str = "auto"
    init_std: float = 0.02
    # Recipe options (docs/recipe.md); the defaults are the original model, parameter for parameter.
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before RoPE (attn/q_norm, attn/k_norm)
    zero_init_out: bool = False  # projections writing into the residual stream (w_o, w_down) start at zero
    mlp: str = "swiglu"  # dense FFN: swiglu | relu2 (MLP_KINDS)
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap); 0 = off
    moe: MoESpec | None = None  # None: every block has a dense FFN (model.mlp)

    def __post_init__(self):
        for name in ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "ffn_hidden",
                     "seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.num_kv_heads={self.num_kv_heads} must divide model.num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"the head dimension {self.head_dim} must be even for RoPE "
                              "(adjust model.d_model, num_heads or head_dim)")
        check_choice("model.dtype", self.dtype, DTYPES)
        check_choice("model.remat", self.remat, REMAT_POLICIES)
        check_choice("model.attention", self.attention, ATTENTION_BACKENDS)
        check_choice("model.mlp", self.mlp, MLP_KINDS)
        if self.logit_softcap < 0:
            raise ConfigError(f"model.logit_softcap={self.logit_softcap} must not be negative (0 = off)")
        if self.moe is not None and any(not 0 <= i < self.num_layers for i in self.moe.layers):
            raise ConfigError(f"MoE layers {self.moe.layers} outside the model's {self.num_layers} blocks")

    @classmethod
    def from_config(cls, cfg, moe_cfg=None) -> ModelSpec:
        """Resolve head_dim = 0 to d_model // num_heads and ffn_hidden = 0 to 8/3 * d_model rounded up to 64.

        `moe_cfg` is the config's separate `moe` section; with num_experts > 0 it becomes `spec.moe`,
        its layer pattern resolved against num_layers and expert_hidden = 0 resolved to
        ffn_hidden / (top_k + num_shared_experts) rounded up to 64, so a token's active FFN
        compute stays close to the dense block's.
        """
        fields = {f.name: cfg[f.name] for f in dataclasses.fields(cls) if f.name in cfg and f.name != "moe"}
        if not fields["head_dim"]:
            if cfg.num_heads <= 0 or cfg.d_model % cfg.num_heads:
                raise ConfigError(f"model.num_heads={cfg.num_heads} must divide model.d_model={cfg.d_model} "
                                  "(or set model.head_dim)")
            fields["head_dim"] = cfg.d_model // cfg.num_heads
        if not fields["ffn_hidden"]:
            fields["ffn_hidden"] = 64 * math.ceil(8 * cfg.d_model / (3 * 64))
        if moe_cfg is not None and moe_cfg.num_experts > 0:
            active = moe_cfg.top_k + moe_cfg.num_shared_experts
            fields["moe"] = MoESpec(
                num_experts=moe_cfg.num_experts, top_k=moe_cfg.top_k, num_shared_experts=moe_cfg.num_shared_experts,
                layers=moe_layer_indices(moe_cfg.layers, cfg.num_layers),
                expert_hidden=moe_cfg.expert_hidden or 64 * math.ceil(fields["ffn_hidden"] / (64 * max(active, 1))),
                score=moe_cfg.score, balance=moe_cfg.balance, bias_update_rate=moe_cfg.bias_update_rate,
                aux_loss_weight=moe_cfg.aux_loss_weight, router_z_loss_weight=moe_cfg.router_z_loss_weight,
                capacity_factor=moe_cfg.capacity_factor, dispatch=moe_cfg.dispatch)
        return cls(**fields)

    def is_moe(self, layer: int) -> bool:
        return self.moe is not None and layer in self.moe.layers

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The dtype of activations and matmul inputs."""
        return jnp.dtype(self.dtype)

    @property
    def out_std(self) -> float:
        """Init std of the projections writing into the residual stream (GPT-2 scaling), so the
        residual variance does not grow with depth; 0 with zero_init_out (each block starts as the
        identity, modded-nanogpt style)."""
        return 0.0 if self.zero_init_out else self.init_std / math.sqrt(2 * self.num_layers)

    @property
    def relu2_hidden(self) -> int:
        """Hidden width of a relu2 FFN: two matrices of 3/2 * ffn_hidden hold what SwiGLU's three
        of ffn_hidden do (exactly, for an even ffn_hidden)."""
        return 3 * self.ffn_hidden // 2

    def dense_ffn_params(self) -> int:
        """Weights of one dense FFN block (no biases)."""
        if self.mlp == "relu2":
            return 2 * self.d_model * self.relu2_hidden
        return 3 * self.d_model * self.ffn_hidden

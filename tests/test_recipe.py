"""The recipe options of issue 17: Muon routed by parameter path, and the architecture options,
which, turned off, are the model as it was."""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib._muon import orthogonalize_via_newton_schulz

from pufferfish_jax.config import apply_overrides, defaults
from pufferfish_jax.model.spec import ModelSpec
from pufferfish_jax.model.transformer import Transformer, count_params, init_variables
from pufferfish_jax.train.muon import dimension_numbers, muon_direction, param_labels
from pufferfish_jax.train.state import make_optimizer

TINY = ["model.vocab_size=96", "model.seq_len=16", "model.num_layers=2", "model.d_model=32", "model.num_heads=4",
        "model.num_kv_heads=2", "model.dtype=float32"]
MOE = ["model.tie_embeddings=false", "moe.num_experts=4", "moe.layers=after_first"]
# init_variables(key 7) params of TINY and TINY + MOE, and a corner of their logits, as computed by the
# code before these options existed (commit 797ed13): the options off must reproduce them. Params as
# a hash of their names and shapes plus two random projections of their values, because the values
# themselves move by an ulp with XLA's flags (the suite's fast compile) and CPU.
OLD = {(): (("1208e4e43b54534a", [-9.836268378400515, 1.948690399202467]),
            [[-0.15716704726219177, 0.15481555461883545, -0.12165117263793945, 0.16975167393684387],
             [0.00997105985879898, -0.07334665954113007, 0.0668674036860466, -0.012442034669220448]]),
       tuple(MOE): (("220a4a4fa2723908", [-3.312849771327004, 22.49791124033958]),
                    [[-0.03894652798771858, -0.10580939054489136, -0.035928305238485336, 0.08786213397979736],
                     [-0.0580621138215065, 0.20561155676841736, -0.08279014378786087, 0.15682953596115112]])}
OFF = ["model.qk_norm=false", "model.zero_init_out=false", "model.mlp=swiglu", "model.logit_softcap=0"]


def _model(*overrides, forward=True):
    cfg = apply_overrides(defaults(), [*TINY, *overrides])
    spec = ModelSpec.from_config(cfg.model, cfg.moe)
    params, moe_state = jax.jit(lambda key: init_variables(spec, key))(jax.random.key(7))  # one compile, not many
    if not forward:
        return cfg, spec, params, None
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 96)
    logits = jax.jit(lambda p, m, t: Transformer(spec).apply({"params": p, "moe_state": m}, t))(params, moe_state, tokens)
    return cfg, spec, params, np.asarray(logits)


def _signature(params) -> tuple[str, list[float]]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    names = hashlib.sha256(";".join(f"{jax.tree_util.keystr(p)}{x.shape}" for p, x in flat).encode()).hexdigest()[:16]
    values = np.concatenate([np.asarray(x, np.float64).ravel() for _, x in flat])
    return names, (np.random.default_rng(0).standard_normal((2, values.size)) @ values).tolist()


@pytest.mark.parametrize("extra", list(OLD))
def test_options_off_are_the_old_model(extra):
    _, _, params, logits = _model(*extra, *OFF)
    (names, probes), corner = OLD[extra]
    assert _signature(params)[0] == names  # the same parameter names and shapes
    np.testing.assert_allclose(_signature(params)[1], probes, rtol=1e-6)  # the same initial values
    np.testing.assert_allclose(logits[:, -1, :4], corner, rtol=1e-5, atol=1e-6)  # the same forward
    default = apply_overrides(defaults(), [*TINY, *extra])  # and the options' defaults are off
    assert ModelSpec.from_config(default.model, default.moe) == _model(*extra, *OFF, forward=False)[1]


@pytest.mark.slow  # compiles several whole models: the full suite, not the edit loop
def test_each_option_on_changes_the_model_as_it_says():
    _, spec, base, base_logits = _model()
    _, _, params, logits = _model("model.qk_norm=true")
    assert params["block_0"]["attn"]["q_norm"]["scale"].shape == (8,) and "k_norm" in params["block_1"]["attn"]
    assert not np.allclose(logits, base_logits)
    _, _, params, _ = _model("model.zero_init_out=true", forward=False)
    assert not np.any(params["block_1"]["attn"]["w_o"]) and not np.any(params["block_1"]["mlp"]["w_down"])
    np.testing.assert_array_equal(params["block_1"]["attn"]["w_q"], base["block_1"]["attn"]["w_q"])
    _, relu_spec, params, _ = _model("model.mlp=relu2", forward=False)
    assert set(params["block_0"]["mlp"]) == {"w_up", "w_down"} and params["block_0"]["mlp"]["w_up"].shape == (32, 192)
    size = sum(x.size for x in jax.tree.leaves(params))
    assert size == sum(x.size for x in jax.tree.leaves(base)) == count_params(relu_spec) == count_params(spec)
    _, _, _, logits = _model("model.logit_softcap=0.05")
    assert np.abs(logits).max() < 0.05 < np.abs(base_logits).max()
    _, qk_spec, params, _ = _model("model.qk_norm=true", *MOE, forward=False)
    assert count_params(qk_spec) == sum(x.size for x in jax.tree.leaves(params))


def _first_update(cfg, params, grads):
    optimizer = make_optimizer(cfg.train)
    return jax.jit(lambda g, p: optimizer.update(g, optimizer.init(p), p)[0])(grads, params)


def test_muon_updates_exactly_the_hidden_matrices():
    """Adam's first update is sign(g), every entry +-1; Muon's is an orthogonalized matrix. The
    leaves whose update is not a sign pattern are exactly the intended ones."""
    cfg, _, params, _ = _model("model.qk_norm=true", *MOE, "train.optimizer=muon", "train.weight_decay=0",
                               "train.grad_clip=0", forward=False)
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.size), x.shape), params)
    updates = _first_update(cfg, params, grads)
    flat = {jax.tree_util.keystr(path): u for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]}
    muon = {path for path, u in flat.items() if not np.allclose(np.abs(u), 1.0, rtol=1e-4)}
    attn = {f"['block_{i}']['attn']['{w}']" for i in (0, 1) for w in ("w_q", "w_k", "w_v", "w_o")}
    ffn = {f"['block_0']['mlp']['{w}']" for w in ("w_gate", "w_up", "w_down")}
    experts = {f"['block_1']['moe']{s}['{w}']" for s in ("", "['shared']") for w in ("w_gate", "w_up", "w_down")}
    assert muon == attn | ffn | experts
    labels = jax.tree_util.tree_flatten_with_path(param_labels(params))[0]
    assert {jax.tree_util.keystr(p) for p, label in labels if label == "muon"} == muon
    assert {"['embed']['embedding']", "['lm_head']", "['block_1']['moe']['router']",
            "['block_0']['attn']['q_norm']['scale']", "['final_norm']['scale']"} <= set(flat) - muon


def test_an_orthogonalized_random_matrix_has_singular_values_near_one():
    train_cfg = apply_overrides(defaults(), ["train.optimizer=muon", "train.lr=0.01", "train.muon_lr=0.01"]).train  # ratio 1
    g = {"w_up": jax.random.normal(jax.random.key(0), (64, 128)) * 1e-3}  # scale-free: tiny gradients too
    direction = muon_direction(train_cfg)
    update = jax.jit(lambda g: direction.update(g, direction.init(g), g)[0])(g)
    before = np.linalg.svd(np.asarray(g["w_up"]), compute_uv=False)
    after = np.linalg.svd(np.asarray(update["w_up"]) / np.sqrt(128 / 64), compute_uv=False)  # less optax's shape scale
    assert before.max() / before.min() > 4  # the input is far from orthogonal
    assert 0.6 < after.min() and after.max() < 1.2  # optax's quintic: near one, not exactly one


def test_3d_weights_are_orthogonalized_as_matrices_and_each_expert_alone():
    coeffs = jnp.asarray((3.4445, -4.7750, 2.0315))
    w_q = jax.random.normal(jax.random.key(1), (32, 4, 8))
    got = orthogonalize_via_newton_schulz(w_q, coeffs, dimension_numbers=dimension_numbers(("attn", "w_q"), 3))
    np.testing.assert_allclose(got.reshape(32, 32), orthogonalize_via_newton_schulz(w_q.reshape(32, 32), coeffs),
                               rtol=1e-5, atol=1e-6)
    w_o = jax.random.normal(jax.random.key(2), (4, 8, 32))
    got = orthogonalize_via_newton_schulz(w_o, coeffs, dimension_numbers=dimension_numbers(("attn", "w_o"), 3))
    np.testing.assert_allclose(got.reshape(32, 32), orthogonalize_via_newton_schulz(w_o.reshape(32, 32), coeffs),
                               rtol=1e-5, atol=1e-6)
    experts = jax.random.normal(jax.random.key(3), (4, 32, 64)) * jnp.arange(1, 5)[:, None, None]
    got = orthogonalize_via_newton_schulz(experts, coeffs, dimension_numbers=dimension_numbers(("moe", "w_up"), 3))
    for e in range(4):
        np.testing.assert_allclose(got[e], orthogonalize_via_newton_schulz(experts[e], coeffs), rtol=1e-5, atol=1e-6)


def test_adamw_keeps_the_state_layout_checkpoints_hold():
    cfg, _, params, _ = _model("train.optimizer=adamw", forward=False)
    state = make_optimizer(cfg.train).init(params)
    assert isinstance(state[0], optax.EmptyState) and isinstance(state[1], optax.ScaleByAdamState)
    assert jax.tree.structure(state[1].mu) == jax.tree.structure(params)


def test_step_timings_keep_their_keys_and_muon_and_costly_options_get_their_own():
    from dataclasses import replace

    from pufferfish_jax import sharding
    from pufferfish_jax.budget.calibrate import _shape_key, family_key

    _, spec, _, _ = _model(forward=False)
    key = _shape_key(spec, 8)
    assert not any(name in key for name in ("qk_norm", "zero_init_out", "logit_softcap", '"mlp"'))  # as before
    assert _shape_key(replace(spec, zero_init_out=True), 8) == key  # costs nothing
    assert len({key, _shape_key(replace(spec, qk_norm=True), 8), _shape_key(replace(spec, mlp="relu2"), 8)}) == 3
    mesh, adamw = sharding.single_device_mesh(), apply_overrides(defaults(), ["train.optimizer=adamw"]).train
    assert family_key(spec, defaults().train, mesh) != family_key(spec, adamw, mesh)


def test_export_refuses_the_options_llama_cannot_compute_and_keeps_zero_init():
    from dataclasses import replace

    from pufferfish_jax.errors import ExportError
    from pufferfish_jax.export.llama_map import check_exportable

    _, spec, _, _ = _model(forward=False)
    check_exportable(replace(spec, zero_init_out=True))  # an initialisation: the model computes what Llama does
    for option, value in (("qk_norm", True), ("mlp", "relu2"), ("logit_softcap", 15.0)):
        with pytest.raises(ExportError, match=f"model.{option}="):
            check_exportable(replace(spec, **{option: value}))

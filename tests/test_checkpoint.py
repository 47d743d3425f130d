"""Save -> shape-inferred restore -> identical logits, and refusal of bad checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, models

from pufferfish_jax.config import apply_overrides, defaults
from pufferfish_jax.model.transformer import Transformer
from pufferfish_jax.model.spec import ModelSpec
from pufferfish_jax.train import checkpoint
from pufferfish_jax.train.state import abstract_state, init_state, make_optimizer


def _config(**model):
    overrides = ["steps=1", "model.vocab_size=96", "model.seq_len=16"] + [f"model.{k}={v}" for k, v in model.items()]
    return apply_overrides(defaults(), overrides)


@pytest.mark.slow  # compiles several whole models: the full suite, not the edit loop
@pytest.mark.parametrize("model", [dict(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2),
                                   dict(num_layers=3, d_model=48, num_heads=6, num_kv_heads=3, tie_embeddings=False)])
def test_restore_infers_shape_and_reproduces_logits(tmp_path, model):
    cfg = _config(**model)
    spec = ModelSpec.from_config(cfg.model)
    optimizer = make_optimizer(cfg.train)
    state = jax.jit(init_state, static_argnums=(0, 1))(spec, optimizer, jax.random.key(1))  # jit: eager is slow
    tokenizer_json = Tokenizer(models.BPE()).to_str()
    manager = checkpoint.open_manager(tmp_path / "checkpoints", keep=2)
    record = {"step": 0, "elapsed_s": 1.5, "progress": 0.0, "data_fingerprint": "abc"}
    checkpoint.save(manager, state, cfg, tokenizer_json, record)
    manager.wait_until_finished()
    manager.close()

    ref = checkpoint.locate(tmp_path)  # the run dir is enough: no architecture is repeated
    saved_cfg, saved_tokenizer = checkpoint.load_metadata(ref)
    assert saved_cfg.to_dict() == cfg.to_dict() and Tokenizer.from_str(saved_tokenizer).to_str() == tokenizer_json
    restored_spec = ModelSpec.from_config(saved_cfg.model)
    restored = checkpoint.restore_state(ref, abstract_state(restored_spec, make_optimizer(saved_cfg.train)))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 16)), jnp.int32)
    before = jax.jit(Transformer(spec).apply)({"params": state.params}, tokens)
    after = jax.jit(Transformer(restored_spec).apply)({"params": restored.params}, tokens)
    np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(state.opt_state)
    assert checkpoint.load_progress(ref) == record | {"format": checkpoint.FORMAT}


def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path):
    cfg = _config(num_layers=1, d_model=32, num_heads=4, num_kv_heads=2)
    spec = ModelSpec.from_config(cfg.model)
    optimizer = make_optimizer(cfg.train)
    state = jax.jit(init_state, static_argnums=(0, 1))(spec, optimizer, jax.random.key(0))
    manager = checkpoint.open_manager(tmp_path / "checkpoints", keep=3)
    for step in (1, 2):
        state = state.replace(step=jnp.asarray(step, jnp.int32))
        checkpoint.save(manager, state, cfg, Tokenizer(models.BPE()).to_str(), {"step": step})
        manager.wait_until_finished()
    manager.close()
    for path in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    warnings = []
    restored, ref = checkpoint.restore_newest(tmp_path / "checkpoints", abstract_state(spec, optimizer), warn=warnings.append)
    assert ref.step == 1 and int(restored.step) == 1
    assert len(warnings) == 1 and "trying the previous checkpoint" in warnings[0]
    with pytest.raises(checkpoint.CheckpointError, match="no readable checkpoint"):
        checkpoint.restore_newest(tmp_path / "checkpoints", abstract_state(spec, optimizer), at_most=0)


def test_locate_rejects_non_checkpoints(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no such"):
        checkpoint.locate(tmp_path / "missing")
    with pytest.raises(checkpoint.CheckpointError, match="holds no checkpoint"):
        checkpoint.locate(tmp_path)

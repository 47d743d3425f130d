"""Run by tests/test_mesh.py in a subprocess with 8 host devices (XLA_FLAGS set before jax loads).

`python tests/mesh_worker.py OUT_DIR` trains the same tiny float32 model for 5 steps on one device
and on several meshes, saves a checkpoint from the (2, 2, 2) mesh, restores it on (8, 1, 1), and
writes what it saw to OUT_DIR/result.json (plus single-device logits for the parent process to
compare with its own restore on its one device).
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from tokenizers import Tokenizer, models  # noqa: E402

from pufferfish_jax import sharding  # noqa: E402
from pufferfish_jax.session import params_digest  # noqa: E402
from pufferfish_jax.config import apply_overrides, defaults  # noqa: E402
from pufferfish_jax.model.transformer import Transformer  # noqa: E402
from pufferfish_jax.model.spec import ModelSpec
from pufferfish_jax.train import checkpoint  # noqa: E402
from pufferfish_jax.train.state import abstract_state, create_state, make_optimizer  # noqa: E402
from pufferfish_jax.train.step import make_train_step  # noqa: E402

MESHES = ((8, 1, 1), (1, 8, 1), (2, 2, 2))
STEPS, BATCH = 5, 8


def config(grad_accum: int = 1, *extra: str) -> ml_collections.ConfigDict:
    """Tiny, float32, every size divisible by the mesh axes that split it (vocab, heads, mlp by 2; embed by 8);
    AdamW unless `extra` says otherwise (Muon has its own case below)."""
    return apply_overrides(defaults(), [
        "steps=5", "model.vocab_size=96", "model.seq_len=16", "model.num_layers=1", "model.d_model=32",
        "model.num_heads=4", "model.num_kv_heads=2", "model.ffn_hidden=64", "model.dtype=float32",
        "model.tie_embeddings=false", f"train.batch_size={BATCH}", f"train.grad_accum={grad_accum}", "train.lr=0.01",
        "train.optimizer=adamw", *extra])


def mesh_of(shape, devices=None):
    return sharding.make_mesh(ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, shape))), devices)


def train(cfg, mesh):
    """(state, losses) after STEPS steps of the real jitted step on `mesh`."""
    spec, optimizer = ModelSpec.from_config(cfg.model), make_optimizer(cfg.train)
    state = create_state(spec, optimizer, cfg.train.seed, mesh)
    step = make_train_step(spec, optimizer, cfg.train.grad_accum, mesh)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(STEPS):
        window = rng.integers(0, spec.vocab_size, (BATCH, spec.seq_len + 1)).astype(np.int32)
        state, metrics = step(state, sharding.global_batch(window, mesh, BATCH), np.float32(cfg.train.lr))
        losses.append(float(metrics["loss"]))
    return state, losses


def logits_on(spec, params, mesh, tokens):
    """Forward pass with the params and tokens placed on `mesh`, as a numpy array."""
    def forward(params, tokens):
        with sharding.activation_sharding(mesh):
            return Transformer(spec).apply({"params": params}, tokens)

    return np.asarray(jax.jit(forward, out_shardings=sharding.replicated(mesh))(params, sharding.global_batch(tokens, mesh, len(tokens))))


def main(out: Path) -> None:
    assert jax.device_count() == 8, jax.devices()
    started = time.time()
    result = {"losses": {}, "specs": {}}
    one = mesh_of((1, 1, 1), jax.devices()[:1])
    result["losses"]["single/1"] = train(config(), one)[1]
    # The mesh that splits every axis also accumulates 2 micro-batches of 4 rows, which must give the
    # loss of the batch of 8: one compile covers both (each mesh's program is about 3 s to compile).
    for shape in MESHES:
        grad_accum = 2 if shape == (2, 2, 2) else 1
        state, losses = train(config(grad_accum), mesh_of(shape))
        result["losses"][f"{shape}/{grad_accum}"] = losses
        w_q = state.params["block_0"]["attn"]["w_q"]
        result["specs"][str(shape)] = {"w_q": str(w_q.sharding.spec),
                                       "w_q_shard": list(w_q.addressable_shards[0].data.shape),
                                       "mu_w_q": str(state.opt_state[1].mu["block_0"]["attn"]["w_q"].sharding.spec)}
        if shape == (2, 2, 2):  # the checkpoint, restored below on (8, 1, 1)
            saved = state

    # Muon's Newton-Schulz iterations on fsdp- and tensor-split matrices (its momentum split like them).
    muon = config(1, "train.optimizer=muon", "model.qk_norm=true")
    result["muon"] = {"single": train(muon, one)[1]}
    for shape in ((2, 2, 2),):  # fsdp and tensor both split w_q
        state, result["muon"][str(shape)] = train(muon, mesh_of(shape))
        mu = state.opt_state[1].inner_states["muon"].inner_state[0].mu["block_0"]["attn"]["w_q"]
        result["specs"][f"muon {shape}"] = {"w_q": str(state.params["block_0"]["attn"]["w_q"].sharding.spec),
                                            "mu_w_q": str(mu.sharding.spec)}

    cfg = config()
    spec, optimizer = ModelSpec.from_config(cfg.model), make_optimizer(cfg.train)
    manager = checkpoint.open_manager(out / "checkpoints", keep=1)
    checkpoint.save(manager, saved, cfg, Tokenizer(models.BPE()).to_str(), {"step": STEPS})
    manager.wait_until_finished()
    manager.close()
    eight = mesh_of((8, 1, 1))
    restored = checkpoint.restore_state(checkpoint.locate(out), abstract_state(spec, optimizer, eight))
    tokens = np.random.default_rng(1).integers(0, spec.vocab_size, (8, spec.seq_len)).astype(np.int32)
    moved = jax.device_put(saved.params, jax.tree.map(lambda x: NamedSharding(eight, x.sharding.spec), restored.params))
    result["restored_on_8"] = {
        "sharding": str(restored.params["block_0"]["attn"]["w_q"].sharding.mesh.shape),
        "params_equal": all(np.array_equal(np.asarray(a), np.asarray(b))
                            for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(restored))),
        "logits_equal": bool(np.array_equal(logits_on(spec, restored.params, eight, tokens),
                                            logits_on(spec, moved, eight, tokens))),
    }
    result["digest"] = params_digest(saved.params)
    gathered = jax.device_put(saved.params, jax.devices()[0])
    np.save(out / "tokens.npy", tokens)
    np.save(out / "logits.npy", logits_on(spec, gathered, one, tokens))
    result["seconds"] = time.time() - started
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""Scale-out: mesh config, logical axes, per-process data, planner on a mesh; then, in subprocesses
(this process has one device), meshes of 8 host devices against one device, resharding restore,
and a two-process jax.distributed run against a one-process run.

Tolerance: every mesh computes the same float32 math with different reduction orders, so losses
agree to rounding; 2e-6 relative is what we allow (observed: at most 1.1e-7, one float32 ulp; with
Muon's Newton-Schulz iterations on split matrices, 2e-7).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from conftest import FAST_COMPILE, private_cache, story_corpus
from test_planner import FakeCache

from pufferfish_jax import cli, sharding
from pufferfish_jax.budget import planner
from pufferfish_jax.budget.memory import memory_bytes
from pufferfish_jax.session import params_digest
from pufferfish_jax.config import apply_overrides, defaults, validate
from pufferfish_jax.errors import ConfigError
from pufferfish_jax.data.pipeline import batch_at
from pufferfish_jax.model.transformer import init_variables
from pufferfish_jax.model.spec import ModelSpec
from pufferfish_jax.train import checkpoint
from pufferfish_jax.train.metrics import read_metrics
from pufferfish_jax.train.state import abstract_state, make_optimizer

ROOT = Path(__file__).resolve().parent.parent
RTOL = 2e-6


def _mesh_cfg(data, fsdp, tensor):
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def test_mesh_shape_fills_one_axis_and_refuses_what_does_not_fit():
    assert sharding.mesh_shape(_mesh_cfg(-1, 1, 1), 8) == (8, 1, 1)
    assert sharding.mesh_shape(_mesh_cfg(2, -1, 2), 8) == (2, 2, 2)
    assert sharding.mesh_shape(_mesh_cfg(1, 8, 1), 8) == (1, 8, 1)
    with pytest.raises(ConfigError, match="multiple of 3 devices"):
        sharding.mesh_shape(_mesh_cfg(3, -1, 1), 8)
    with pytest.raises(ConfigError, match="uses 2 of the 8 devices"):
        sharding.mesh_shape(_mesh_cfg(2, 1, 1), 8)
    for bad in ("mesh.data=0", "mesh.fsdp=-1"):  # zero; or two axes that both want the rest
        with pytest.raises(ConfigError, match="mesh"):
            validate(apply_overrides(defaults(), ["steps=1", bad]))


def test_cli_refuses_a_mesh_that_does_not_fit_in_one_line(capsys):
    assert cli.main(["train", "steps=1", "mesh.data=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "mesh.data=3" in err and "there are 1" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("overrides", [["model.tie_embeddings=True"], ["model.tie_embeddings=False"],
                                       ["moe.num_experts=4", "moe.layers=after_first"]])
def test_every_parameter_has_logical_axes_and_params_stay_plain(overrides):
    cfg = apply_overrides(defaults(), ["model.vocab_size=96", *overrides])
    spec = ModelSpec.from_config(cfg.model, cfg.moe)
    boxed = jax.eval_shape(lambda: init_variables(spec, jax.random.key(0), boxed=True)[0])
    names = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, tuple))
    shapes = jax.tree.leaves(nn.meta.unbox(boxed))
    ruled = {name for name, _ in sharding.LOGICAL_RULES} | {"head_dim"}
    assert len(names) == len(shapes) and all(len(n) == len(s.shape) for n, s in zip(names, shapes))
    assert {axis for n in names for axis in n} <= ruled and "expert" in ruled
    plain = jax.eval_shape(lambda: init_variables(spec, jax.random.key(0))[0])
    assert jax.tree.structure(plain) == jax.tree.structure(nn.meta.unbox(boxed))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(plain))


def test_each_process_reads_its_rows_of_the_same_global_batch():
    tokens = (np.arange(4000) % 251).astype(np.uint16)
    for step in (0, 5, 400):  # 400 is past the first epoch
        whole = batch_at(tokens, seq_len=8, batch_size=8, seed=3, step=step)
        parts = [batch_at(tokens, seq_len=8, batch_size=8, seed=3, step=step, part=(i, 4)) for i in range(4)]
        np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert sharding.process_part(sharding.single_device_mesh(), 8) == (0, 1)


def test_planner_sizes_the_global_batch_and_memory_per_device():
    spec = ModelSpec.from_config(apply_overrides(defaults(), ["model.vocab_size=8192"]).model)
    alone, data8, fsdp8 = (memory_bytes(spec, 64, 1, m) for m in ((1, 1, 1), (8, 1, 1), (1, 8, 1)))
    assert fsdp8 < data8 < alone  # fsdp also splits the state; data splits only the activations
    cfg = apply_overrides(defaults(), ["budget=600s", "model.vocab_size=8192"])
    mesh = AbstractMesh((2, 4, 1), sharding.MESH_AXES)
    plan = planner.budget_plan(cfg, budget_s=600, deadline=1600.0, train_tokens=1_200_000, val_tokens=14_000,
                               cache=FakeCache(), user_keys=set(), memory_limit=24 * 2**30, mesh=mesh,
                               clock=lambda: 1000.0)
    assert plan.mesh == [2, 4, 1] and plan.batch_size % 8 == 0
    assert all(c["batch_size"] % 8 == 0 for c in plan.candidates)


def _subprocess_env(devices: int) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"}


@pytest.mark.slow
def test_meshes_match_one_device_and_checkpoints_reshard(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "mesh_worker.py"), str(tmp_path)],
                            env=_subprocess_env(8), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads((tmp_path / "result.json").read_text())
    reference = seen["losses"].pop("single/1")
    assert set(seen["losses"]) == {"(8, 1, 1)/1", "(1, 8, 1)/1", "(2, 2, 2)/2"}
    for name, losses in seen["losses"].items():
        np.testing.assert_allclose(losses, reference, rtol=RTOL, err_msg=name)
    assert reference[0] != reference[-1]  # the steps did change the model
    # FSDP splits the model width, tensor the heads; Adam's moments follow their parameter.
    assert seen["specs"]["(1, 8, 1)"]["w_q_shard"] == [4, 4, 8]
    assert seen["specs"]["(2, 2, 2)"]["w_q"] == seen["specs"]["(2, 2, 2)"]["mu_w_q"] == "P('fsdp', 'tensor', None)"
    assert seen["specs"]["(8, 1, 1)"]["w_q_shard"] == [32, 4, 8]  # pure data parallelism replicates
    assert seen["restored_on_8"]["params_equal"] and seen["restored_on_8"]["logits_equal"]
    # Muon orthogonalizes split matrices to the same result as whole ones (XLA gathers what it needs).
    muon = seen["muon"].pop("single")
    for name, losses in seen["muon"].items():
        np.testing.assert_allclose(losses, muon, rtol=RTOL, err_msg=f"muon {name}")
    assert muon[0] != muon[-1] and muon != reference
    assert seen["specs"]["muon (2, 2, 2)"]["mu_w_q"] == seen["specs"]["muon (2, 2, 2)"]["w_q"] == "P('fsdp', 'tensor', None)"

    # The (2, 2, 2) checkpoint on this process's single device, as generate and eval restore it.
    ref = checkpoint.locate(tmp_path)
    cfg, _ = checkpoint.load_metadata(ref)
    spec = ModelSpec.from_config(cfg.model)
    restored = checkpoint.restore_state(ref, abstract_state(spec, make_optimizer(cfg.train)))
    sys.path.insert(0, str(ROOT / "tests"))
    from mesh_worker import logits_on

    assert params_digest(restored.params) == seen["digest"]  # bit-identical parameters
    tokens = np.load(tmp_path / "tokens.npy")
    logits = logits_on(spec, restored.params, sharding.single_device_mesh(), tokens)
    # Same params, same one-device program, but compiled here without FAST_COMPILE: equal to rounding.
    np.testing.assert_allclose(logits, np.load(tmp_path / "logits.npy"), rtol=1e-5, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path, monkeypatch, session_cache):
    corpus = story_corpus(tmp_path / "corpus.txt", sentences=1500)
    args = ["train", "steps=3", f"data.corpus={corpus}", "data.vocab_size=300", "model.num_layers=1",
            "model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2", "model.seq_len=16",
            "model.dtype=float32", "train.batch_size=4", "train.log_every=1", "train.eval_tokens=64"]
    env = {**_subprocess_env(1), "PUFFERFISH_CACHE": str(private_cache(tmp_path / "cache", session_cache))}
    # Data preparation first, so the three runs below find the token cache ready.
    from pufferfish_jax.data.prepare import prepare_data

    prepare_data(apply_overrides(defaults(), args[1:]).data, tmp_path / "cache")
    coordinator = f"localhost:{_free_port()}"
    launch = [sys.executable, "-m", "pufferfish_jax"]
    runs = [subprocess.Popen(launch + args + [f"run_dir={tmp_path / 'two'}", f"mesh.coordinator={coordinator}",
                                              "mesh.num_processes=2", f"mesh.process_id={i}"],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in (0, 1)]
    # The same run on one process, here while those two run (a third fresh process only adds its start-up).
    monkeypatch.setenv("PUFFERFISH_CACHE", env["PUFFERFISH_CACHE"])
    assert cli.main(args + [f"run_dir={tmp_path / 'one'}"]) == 0
    outputs = [run.communicate(timeout=300) for run in runs]
    for run, (_, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-3000:]
    assert "final:" in outputs[0][0] and "final:" not in outputs[1][0]  # only process 0 prints

    def losses(run_dir):
        return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["event"] == "train"]

    assert len(losses(tmp_path / "two")) == 3  # one writer, not two
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=RTOL)
    assert checkpoint.saved_steps(tmp_path / "two" / "checkpoints") == [3]


@pytest.mark.slow  # two fresh jax processes
def test_processes_follow_process_0s_attention_backend_when_their_timings_disagree():
    """Two jax.distributed processes whose own timings pick different backends (forced in
    tests/agree_worker.py): alone each keeps its own, in a program spanning both each uses process 0's."""
    coordinator = f"localhost:{_free_port()}"
    runs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "agree_worker.py"), coordinator, str(i)],
                             env=_subprocess_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in (0, 1)]
    outputs = [run.communicate(timeout=120) for run in runs]
    for run, (_, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-3000:]
    seen = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert [s["devices"] for s in seen] == [2, 2] and [s["process"] for s in seen] == [0, 1]
    assert [s["local"] for s in seen] == ["pallas", "xla"]  # the disagreement happened
    assert [s["agreed"] for s in seen] == ["pallas", "pallas"]
    assert all(s["timed"] == [["cudnn", "pallas", "xla"]] for s in seen)  # each timed once, then the choice was reused

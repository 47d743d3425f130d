"""Export to Hugging Face and GGUF and import back, checked against the real consumers: transformers
(PyTorch on the CPU) loads the export and computes our logits and our greedy continuations, gguf's
reader reads the GGUF file, and an export imported and exported again is the same bytes."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_MODEL
from tokenizers import Tokenizer

from pufferfish_jax import config as config_lib
from pufferfish_jax import session
from pufferfish_jax.cli import main
from pufferfish_jax.errors import ConfigError, ExportError
from pufferfish_jax.export import hf_folder, hf_import, llama_map
from pufferfish_jax.export.gguf_file import gguf_name
from pufferfish_jax.export.write import export_model
from pufferfish_jax.generate import Sampling, generate
from pufferfish_jax.model.layers import apply_rope, rope_angles
from pufferfish_jax.model.spec import MoESpec, ModelSpec
from pufferfish_jax.model.transformer import Transformer, init_variables

PROMPTS = ["The river ran past", "Children played by", "the old mill and", "Bread and stone"]


@pytest.fixture(scope="module")
def restored(trained_run):
    return session.restore(trained_run)


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "hf"
    assert main(["export", str(trained_run), str(out)]) == 0
    return out


def _prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(p).ids[:8] for p in PROMPTS]  # 8 + 20 new tokens fit the 32-token context


# The trained run is tied, with one kv head and default RoPE; the random model covers the rest:
# an untied head, grouped heads (4 query heads on 2 kv heads), another theta and eps, two layers,
# and weights large enough that greedy decoding wanders instead of repeating one token.
RANDOM_SPEC = ModelSpec(vocab_size=300, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16,
                        ffn_hidden=96, seq_len=32, rope_theta=500.0, norm_eps=1e-6, tie_embeddings=False,
                        dtype="float32", init_std=0.15)


@pytest.fixture(scope="module", params=["trained", "random"])
def model_case(request, restored, exported, tmp_path_factory):
    """(spec in float32, params, tokenizer, exported folder) of each model above."""
    if request.param == "trained":
        return dataclasses.replace(restored.spec, dtype="float32"), restored.state.params, restored.tokenizer, exported
    params, _ = jax.jit(init_variables, static_argnums=0)(RANDOM_SPEC, jax.random.key(3))  # jit: eager is slow
    folder = tmp_path_factory.mktemp("random") / "hf"
    export_model(RANDOM_SPEC, params, restored.tokenizer, folder)
    return RANDOM_SPEC, params, restored.tokenizer, folder


@pytest.mark.slow  # imports torch and transformers (about 6 s of CPU), compiles decoding
def test_transformers_computes_our_logits(model_case):
    """Same tokens in, the same float32 logits out of LlamaForCausalLM, to 1e-4."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec, params, tokenizer, folder = model_case
    hf_tokenizer = AutoTokenizer.from_pretrained(folder)
    assert [hf_tokenizer(p)["input_ids"][:8] for p in PROMPTS] == _prompt_ids(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rows = [ids + [0] * (32 - len(ids)) for ids in _prompt_ids(tokenizer)]
    rows += [list(range(1 + 9 * i, 33 + 9 * i)) for i in range(2)]  # full-context rows too
    tokens_BT = np.array(rows, np.int32)
    forward = jax.jit(Transformer(dataclasses.replace(spec, attention="xla")).apply)  # jit: eager is slower
    ours_BTV = np.asarray(forward({"params": params}, jnp.asarray(tokens_BT)))
    with torch.no_grad():
        theirs_BTV = model(torch.from_numpy(tokens_BT.astype(np.int64))).logits.numpy()
    diff = float(np.abs(ours_BTV - theirs_BTV).max())
    print(f"logits max abs diff {diff:.2e} over {tokens_BT.shape} tokens, logits std {ours_BTV.std():.3f}")
    assert ours_BTV.std() > 0.1  # logits that say something, not a constant
    assert diff <= 1e-4


@pytest.mark.slow  # imports torch and transformers (about 6 s of CPU), compiles decoding
def test_transformers_greedy_continuations_equal_ours(model_case):
    import torch
    from transformers import AutoModelForCausalLM

    spec, params, tokenizer, folder = model_case
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    greedy = Sampling(max_new_tokens=20, min_new_tokens=0, temperature=0.0, top_k=0, top_p=1.0)
    for ids in _prompt_ids(tokenizer):
        ours = generate(spec, params, ids, greedy, eos_id=0)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=0, pad_token_id=0)
        theirs = out[0, len(ids):].tolist()
        print(f"greedy {ours}")
        assert len(ours) >= 5 and ours == theirs, (ids, ours, theirs)


@pytest.mark.slow  # the shared trained run: training is not for the edit loop
def test_export_import_export_is_bit_identical(restored, exported, tmp_path):
    """The import path (config keys, tokenizer, weights) gives back our parameters exactly, and
    exporting them again writes the same bytes."""
    cfg = config_lib.apply_overrides(config_lib.defaults(), ["steps=1", f"init_from=hf:{exported}"])
    user_keys = {"train.init_from"}
    hf_import.configure(cfg, user_keys)
    spec = ModelSpec.from_config(cfg.model, cfg.moe)
    assert spec == dataclasses.replace(restored.spec, dtype=cfg.model.dtype)  # the architecture came back
    assert {"model.num_layers", "model.d_model", "model.ffn_hidden"} <= user_keys  # the planner keeps the shape
    params = hf_import.initial_params(cfg)
    for path, ours in llama_map.tensor_names(spec).items():
        a, b = params, restored.state.params
        for key in path:
            a, b = a[key], b[key]
        assert np.array_equal(a, np.asarray(b)), ours
    again = tmp_path / "again"
    export_model(spec, params, Tokenizer.from_file(cfg.data.tokenizer), again)
    files = sorted(p.name for p in exported.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    for name in files:
        assert (exported / name).read_bytes() == (again / name).read_bytes(), name


@pytest.mark.slow  # imports torch and transformers (about 6 s of CPU), compiles decoding
def test_a_checkpoint_saved_by_transformers_imports_with_its_logits(restored, tmp_path):
    """The other direction: a Llama that transformers made and saved (its own config keys,
    rope_parameters, untied, grouped heads) computes the same logits in our model once imported."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, tie_word_embeddings=False,
                         initializer_range=0.15)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "theirs")
    (tmp_path / "theirs" / "tokenizer.json").write_text(restored.tokenizer.to_str())
    cfg = config_lib.apply_overrides(config_lib.defaults(), ["steps=1", f"init_from=hf:{tmp_path / 'theirs'}",
                                                             "model.dtype=float32"])
    hf_import.configure(cfg, {"train.init_from", "model.dtype"})
    spec = ModelSpec.from_config(cfg.model, cfg.moe)
    assert (spec.num_kv_heads, spec.head_dim, spec.rope_theta, spec.tie_embeddings) == (2, 16, 5000.0, False)
    tokens_BT = np.arange(64, dtype=np.int32).reshape(2, 32) * 7 % 300
    forward = jax.jit(Transformer(dataclasses.replace(spec, attention="xla")).apply)
    ours_BTV = np.asarray(forward({"params": hf_import.initial_params(cfg)}, jnp.asarray(tokens_BT)))
    with torch.no_grad():
        theirs_BTV = model(torch.from_numpy(tokens_BT.astype(np.int64))).logits.numpy()
    assert ours_BTV.std() > 0.1 and float(np.abs(ours_BTV - theirs_BTV).max()) <= 1e-4


@pytest.mark.slow  # imports torch and transformers (about 6 s of CPU), compiles decoding
def test_sharded_export_loads_in_transformers(restored, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    written = export_model(restored.spec, restored.state.params, restored.tokenizer, tmp_path / "sharded",
                           dtype="bfloat16", max_shard_bytes=20_000)
    shards = [p for p in written if p.suffix == ".safetensors"]
    assert len(shards) >= 3 and (tmp_path / "sharded" / hf_folder.INDEX).is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    assert model.dtype == torch.bfloat16
    embed = model.state_dict()["model.embed_tokens.weight"].float().numpy()
    ours = np.asarray(restored.state.params["embed"]["embedding"])
    assert np.abs(embed - ours).max() <= np.abs(ours).max() / 128  # bfloat16: 8 bits of mantissa
    read = hf_folder.read_folder(tmp_path / "sharded").tensors
    assert set(read) == set(llama_map.tensor_names(restored.spec).values())


@pytest.mark.slow  # the shared trained run: training is not for the edit loop
def test_gguf_reads_back_with_llama_names_shapes_and_metadata(restored, trained_run, tmp_path):
    from gguf import GGUFReader

    assert main(["export", str(trained_run), str(tmp_path / "m.gguf"), "--format", "gguf"]) == 0
    reader = GGUFReader(tmp_path / "m.gguf")
    spec = restored.spec
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert (field("llama.block_count"), field("llama.context_length"), field("llama.embedding_length"),
            field("llama.feed_forward_length"), field("llama.attention.head_count"),
            field("llama.attention.head_count_kv")) == (1, 32, 32, spec.ffn_hidden, 2, 1)
    assert field("llama.rope.freq_base") == pytest.approx(spec.rope_theta)
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(spec.norm_eps)
    tokens = field("tokenizer.ggml.tokens")
    assert field("tokenizer.ggml.model") == "gpt2" and len(tokens) == spec.vocab_size
    assert tokens[field("tokenizer.ggml.eos_token_id")] == "<|endoftext|>"
    assert len(field("tokenizer.ggml.merges")) > 0
    hf = llama_map.to_hf_tensors(restored.state.params, spec)
    expected = {gguf_name(n): a.shape for n, a in hf.items()}
    assert set(expected) == {"token_embd.weight", "output_norm.weight"} | {
        f"blk.0.{t}.weight" for t in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate",
                                      "ffn_up", "ffn_down")}
    got = {t.name: tuple(t.data.shape) for t in reader.tensors}
    assert got == expected
    assert np.array_equal(next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight").data,
                          hf["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.slow  # the shared trained run: training is not for the edit loop
def test_gguf_query_rows_rotate_as_llama_cpp_does(restored, tmp_path):
    """llama.cpp rotates adjacent pairs (2i, 2i+1); the GGUF q rows must give, under that rotation,
    what our half-split rotation gives under the HF rows, up to the same reordering of features."""
    from gguf import GGUFReader

    export_model(restored.spec, restored.state.params, restored.tokenizer, tmp_path / "m.gguf", fmt="gguf")
    q_gguf = next(t for t in GGUFReader(tmp_path / "m.gguf").tensors if t.name == "blk.0.attn_q.weight").data
    q_hf = llama_map.to_hf_tensors(restored.state.params, restored.spec)["model.layers.0.self_attn.q_proj.weight"]
    N, H = restored.spec.num_heads, restored.spec.head_dim
    x = np.random.default_rng(0).normal(size=(restored.spec.d_model,)).astype(np.float32)
    sin, cos = (np.asarray(a)[0, 0] for a in rope_angles(jnp.array([[5]]), 32, H, restored.spec.rope_theta))
    ours = np.asarray(apply_rope(jnp.asarray((q_hf @ x).reshape(1, 1, N, H)), jnp.asarray(sin)[None, None],
                                 jnp.asarray(cos)[None, None]))[0, 0]  # [N, H]: pairs (i, i + H/2)
    pairs = (q_gguf @ x).reshape(N, H // 2, 2)  # llama.cpp's pairs (2i, 2i + 1)
    rotated = np.stack([pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin], -1)
    assert np.allclose(rotated[..., 0], ours[:, :H // 2], atol=1e-5)
    assert np.allclose(rotated[..., 1], ours[:, H // 2:], atol=1e-5)


def test_moe_and_unmapped_options_are_refused_in_one_line():
    dense = ModelSpec(vocab_size=300, num_layers=2, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16,
                      ffn_hidden=64, seq_len=32)
    llama_map.check_exportable(dense)
    moe = dataclasses.replace(dense, moe=MoESpec(num_experts=4, top_k=2, num_shared_experts=1, layers=(1,),
                                                 expert_hidden=64))
    with pytest.raises(ExportError, match="MoE checkpoint cannot be exported.*shared expert.*sigmoid") as refused:
        llama_map.check_exportable(moe)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("change, key", [
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "mistral"}, "model_type"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling.rope_type"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_parameters.rope_type"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_import_refuses_what_we_cannot_represent_by_name(change, key):
    config = {"model_type": "llama", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
    assert llama_map.model_keys(config)["model.head_dim"] == 16
    with pytest.raises(ExportError, match=f"config.json has {key}="):
        llama_map.model_keys(config | change)


@pytest.mark.slow  # the shared trained run: training is not for the edit loop
def test_import_refuses_unknown_tensors_and_conflicting_keys(restored, exported):
    tensors = llama_map.to_hf_tensors(restored.state.params, restored.spec)
    with pytest.raises(ExportError, match="q_proj.bias"):
        llama_map.from_hf_tensors(tensors | {"model.layers.0.self_attn.q_proj.bias": np.zeros(32)}, restored.spec)
    cfg = config_lib.apply_overrides(config_lib.defaults(), ["steps=1", f"init_from=hf:{exported}", "model.num_layers=3"])
    with pytest.raises(ConfigError, match="model.num_layers=3 conflicts with init_from's 1"):
        hf_import.configure(cfg, {"train.init_from", "model.num_layers"})


@pytest.mark.slow  # the shared trained run: training is not for the edit loop
def test_gguf_refuses_a_tokenizer_llama_cpp_would_split_differently(restored, tmp_path):
    from tokenizers import pre_tokenizers

    other = Tokenizer.from_str(restored.tokenizer.to_str())
    other.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False)])
    with pytest.raises(ExportError, match="pre-tokenizer Sequence"):
        export_model(restored.spec, restored.state.params, other, tmp_path / "m.gguf", fmt="gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.slow  # the shared trained run: training is not for the edit loop
def test_export_refuses_a_folder_with_other_files(trained_run, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["export", str(trained_run), str(tmp_path)]) == 2
    assert "holds files an export does not write (notes.txt)" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_a_run_initialised_from_an_export_starts_at_the_source_runs_loss(trained_run, exported, corpus_file,
                                                                        session_cache, tmp_path, monkeypatch):
    """`train init_from=hf:EXPORT` on the same data: its step-0 eval is the source run's final eval."""
    monkeypatch.setenv("PUFFERFISH_CACHE", str(session_cache))
    run_dir = tmp_path / "imported"
    batch = next(a for a in TINY_MODEL if a.startswith("train.batch_size"))
    assert main(["train", "steps=2", f"init_from=hf:{exported}", f"data.corpus={corpus_file}", batch,
                 f"run_dir={run_dir}"]) == 0
    first = next(json.loads(line) for line in (run_dir / "metrics.jsonl").open() if '"eval"' in line)
    source = json.loads((trained_run / "outcome.json").read_text())
    print(f"step-0 val loss {first['val_loss']:.6f}, source final {source['val_loss']:.6f}")
    assert first["step"] == 0 and abs(first["val_loss"] - source["val_loss"]) <= 1e-3
    saved = json.loads((run_dir / "config.json").read_text())
    assert (saved["model"]["num_layers"], saved["model"]["d_model"], saved["data"]["tokenizer"]) == (
        1, 32, str(exported / "tokenizer.json"))

"""tools/bench_train.py: the PyTorch baseline computes what ours computes, and the table's checks."""

import numpy as np
import pytest
from conftest import load_tool

torch_side = load_tool("bench_train_torch")
tool = load_tool("bench_train")


def _tiny(dtype="float32"):
    spec, train_cfg = tool.model_spec((1, 32, 16, 2), 64, dtype)
    rng = np.random.default_rng(0)
    data = np.tile(rng.integers(0, 64, (1, 2, 17)), (6, 1, 1)).astype(np.int32)  # one batch, learnt fast
    return spec, train_cfg, data


@pytest.mark.slow  # imports torch and compiles a train step
def test_torch_baseline_trains_like_ours_in_both_dtypes_eager(tmp_path):
    """Same parameters, same batches: every step's loss agrees, so the speed comparison is not
    bought with different math (a wrong mask, RoPE or optimizer would show within 6 steps)."""
    spec, train_cfg, data = _tiny()
    init = tmp_path / "init.npz"
    ours = tool.train_ours(spec, train_cfg, data, warmup=1, init_out=str(init))
    assert ours["losses"][-1] < ours["losses"][0] - 0.15  # it learns, so a wrong update would diverge
    flat = dict(np.load(init))
    for dtype, tol in (("float32", 2e-4), ("bfloat16", 0.03)):
        theirs = torch_side.run(spec, train_cfg, flat, data, dtype=dtype, compiled=False, warmup=1, lr=tool.LR)
        assert theirs["params"] == sum(v.size for v in flat.values())
        assert np.allclose(theirs["losses"], ours["losses"], atol=tol), (dtype, theirs["losses"], ours["losses"])


def _results(loss_bf16_torch=7.0):
    run = lambda seconds, loss, compile_s=0.0: [dict(seconds=seconds, compile_s=compile_s, losses=[9.0] + [loss] * 5,  # noqa: E731
                                                     params=tool.count_params_of((1, 32, 16, 2), 64), peak_rss_mib=100.0)]
    return dict(setup=dict(vocab=64, corpus="wiki", shapes={"1x32x16x2": dict(budgets=["1m"], planner_dtype=["float32"])}),
                peaks=[dict(float32=1e9, bfloat16=2e9), dict(float32=2e9, bfloat16=3e9)], steps=10, warmup=1, repeats=1,
                runs={"1x32x16x2": {"ours float32": run(1.0, 7.0, 3.0), "ours bfloat16": run(0.5, 7.0, 3.0),
                                    "torch eager float32": run(2.0, 7.0), "torch eager bfloat16": run(4.0, loss_bf16_torch),
                                    "torch compile float32": run(0.8, 7.0, 20.0)}})


def test_summary_ratios_use_the_faster_dtype_each_side():
    shapes, failures = tool.summarize(_results(), loss_tol=0.05)
    (s,) = shapes
    assert failures == []
    assert s["ours_dtype"] == "bfloat16" and s["ours"] == pytest.approx(640.0)  # 32 tokens x 10 steps / 0.5 s
    assert s["vs_eager"] == pytest.approx(4.0) and s["vs_compile"] == pytest.approx(0.8 / 0.5)
    # MFU over the best peak *of the run's dtype* seen in any repeat
    fpt = s["rows"]["ours float32"]["gflops"] * 1e9 / s["rows"]["ours float32"]["tps"]
    assert s["rows"]["ours bfloat16"]["mfu"] == pytest.approx(640.0 * fpt / 3e9)
    assert s["rows"]["ours float32"]["mfu"] == pytest.approx(320.0 * fpt / 2e9)


def test_a_loss_off_the_float32_reference_fails_the_check():
    _, failures = tool.summarize(_results(loss_bf16_torch=7.2), loss_tol=0.05)
    assert len(failures) == 1 and "torch eager bfloat16" in failures[0]


def test_fast_mode_and_run_selection():
    args = tool.options(["--fast"])
    assert (args.steps, args.repeats, args.baselines) == (4, 1, "eager") and args.shapes
    labels = [r[0] for r in tool.selected_runs("bfloat16", "compile")]
    assert labels == ["ours float32", "ours bfloat16", "torch compile float32", "torch compile bfloat16"]

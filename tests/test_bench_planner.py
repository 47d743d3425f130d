"""The pure parts of tools/bench_planner.py: the recipe grid, regret, the stale-cache edit, merging."""

import json

import pytest
from conftest import load_tool

core = load_tool("bench_planner_core")
tool = load_tool("bench_planner")


def _plan(shape=(4, 128, 4, 2), batch=8, dtype="bfloat16", seq_len=256) -> dict:
    model = dict(zip(core.SHAPE_KEYS, shape), dtype=dtype, seq_len=seq_len, head_dim=32, ffn_hidden=384)
    return dict(model=model, batch_size=batch, seq_len=seq_len, steps=100, budget_s=120.0)


def _key(r):
    return tuple(r["shape"]), r["batch"], r["dtype"], r.get("seq_len") or 256


@pytest.mark.parametrize("shape,batch", [((4, 128, 4, 2), 8), ((2, 128, 4, 2), 8), ((2, 128, 4, 2), 1),
                                         ((32, 2048, 32, 8), 256), ((4, 256, 8, 4), 16)])
def test_grid_is_at_least_eight_distinct_recipes_around_the_plan(shape, batch):
    plan = _plan(shape, batch)
    grid = core.grid_recipes(plan)
    keys = [_key(r) for r in grid]
    assert len(grid) >= 8 and len(set(keys)) == len(keys)
    rung = core.LADDER.index(shape)
    assert (shape, batch, "bfloat16", 256) in keys  # the planner's own recipe, fixed
    assert (shape, batch, "float32", 256) in keys  # the other dtype
    for dr in (-1, 1):  # one rung smaller and larger, where the ladder has them
        if 0 <= rung + dr < len(core.LADDER):
            assert (core.LADDER[rung + dr], batch, "bfloat16", 256) in keys
    for b in (batch / 2, batch * 2):  # batch halved and doubled, where that is a whole batch of 1..256
        if b == int(b) and 1 <= b <= 256:
            assert (shape, int(b), "bfloat16", 256) in keys
    for w in core.WINNERS:  # the earlier winners (2 x d128, batch 8 and 16, seq 256)
        assert _key(w) in keys


def test_grid_cap_and_winner_seq_len_kept_apart_from_the_plans():
    plan = _plan((2, 128, 4, 2), 8, seq_len=64)
    grid = core.grid_recipes(plan, limit=20)
    keys = [_key(r) if r.get("seq_len") else (*_key(r)[:3], 64) for r in grid]
    assert ((2, 128, 4, 2), 8, "bfloat16", 64) in keys and ((2, 128, 4, 2), 8, "bfloat16", 256) in keys
    assert len(set(keys)) == len(keys)
    assert len(core.grid_recipes(plan, limit=3)) == 3
    assert core.grid_recipes(plan, limit=3)[0] == dict(shape=(2, 128, 4, 2), batch=8, dtype="bfloat16")


def test_recipe_overrides_fix_shape_batch_and_dtype():
    r = dict(shape=(3, 192, 6, 2), batch=16, dtype="float32", seq_len=256)
    assert core.recipe_overrides(r) == ["model.num_layers=3", "model.d_model=192", "model.num_heads=6",
                                        "model.num_kv_heads=2", "train.batch_size=16", "model.dtype=float32",
                                        "model.seq_len=256"]


def _row(budget, corpus, kind, label, bpb, status="ok"):
    return dict(budget=budget, corpus=corpus, kind=kind, label=label, status=status, val_bpb=bpb)


def test_regret_and_summary():
    assert core.regret(1.8, 1.5) == pytest.approx(1.2)
    assert core.regret(None, 1.5) is None and core.regret(1.5, None) is None
    rows = [_row("2m", "wiki", "planner", "measured", 1.80), _row("2m", "wiki", "grid", "a", 1.70),
            _row("2m", "wiki", "grid", "b", 1.50), _row("2m", "wiki", "grid", "c", None, status="failed"),
            _row("2m", "wiki", "seed", "seed", 2.40), _row("5m", "wiki", "planner", "measured", 1.4)]
    first, second = core.summarize(rows)
    assert first["regret"] == pytest.approx(1.2) and first["grid_best_recipe"] == "b"
    assert first["seed_bpb"] == 2.40 and first["grid_runs"] == 2 and first["failed"] == 1
    assert second["regret"] is None and second["grid_best_bpb"] is None


def test_scale_step_times_divides_every_step_s_and_nothing_else(tmp_path):
    entry = lambda s: {"flops_per_step": 1e9, "measurement": {"compile_s": 2.0, "step_s": s,  # noqa: E731
                                                             "memory_bytes": 7, "cold_compile_s": 3.0}}
    table = {"cpu:a:1x:2cpu": {"matmul": {"bfloat16": 1e11, "float32": 5e10},
                               '["fam1"]': {'["s1", 8]': entry(0.3), '["s2", 16]': entry(0.9)},
                               '["fam2"]': {'["s3", 4]': entry(0.06)}},
             "cpu:b:1x:8cpu": {'["fam1"]': {'["s1", 8]': entry(0.12)}}}
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(table))
    assert tool.stale_cache(tmp_path, 3.0) == 4
    scaled = json.loads(path.read_text())
    flat = lambda t: [(m, f, s, e) for m, fs in t.items() for f, es in fs.items() for s, e in es.items()]  # noqa: E731
    assert [x[:3] for x in flat(scaled)] == [x[:3] for x in flat(table)]
    for (*_, new), (*_, old) in zip(flat(scaled), flat(table)):
        if isinstance(old, dict):
            assert new["measurement"]["step_s"] == pytest.approx(old["measurement"]["step_s"] / 3)
            assert {k: v for k, v in new["measurement"].items() if k != "step_s"} == \
                   {k: v for k, v in old["measurement"].items() if k != "step_s"}
            assert new["flops_per_step"] == old["flops_per_step"]
        else:
            assert new == old  # the matmul rates stay
    assert core.scale_step_times(table, 3.0) is not table and table["cpu:b:1x:8cpu"]['["fam1"]']['["s1", 8]'][
        "measurement"]["step_s"] == 0.12  # the input is left alone


def test_combine_merges_cells_and_a_rerun_replaces_its_row():
    a = dict(machine={"model": "X"}, rows=[_row("2m", "wiki", "planner", "measured", 1.8),
                                           _row("2m", "wiki", "grid", "a", 1.7)])
    b = dict(machine={"model": "Y"}, rows=[_row("5m", "wiki", "planner", "measured", 1.5)])
    c = [_row("2m", "wiki", "grid", "a", 1.6), _row("2m", "wiki", "seed", "seed", 2.4)]
    merged = core.combine([a, b, c])
    assert merged["machine"] == {"model": "X"}
    assert len(merged["rows"]) == 4
    summary = {s["budget"]: s for s in core.summarize(merged["rows"])}
    assert summary["2m"]["grid_best_bpb"] == 1.6 and summary["2m"]["regret"] == pytest.approx(1.8 / 1.6)
    assert summary["2m"]["seed_bpb"] == 2.4 and summary["5m"]["planner_bpb"] == 1.5
    rerun = dict(_row("2m", "wiki", "planner", "measured", None, status="failed"), slot="measured")
    chosen = dict(_row("2m", "wiki", "planner", "measured: 2 x d128", 1.8), slot="measured")
    assert core.combine([[chosen], [rerun]])["rows"] == [rerun]  # the label grew a recipe; the slot did not


def test_combine_cli_prints_the_summary(tmp_path, capsys):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(dict(machine=None, rows=[_row("2m", "wiki", "planner", "measured", 1.8),
                                                        _row("2m", "wiki", "grid", "a", 1.5)])))
    tool.main(["--combine", str(path), "--markdown"])
    out = capsys.readouterr().out
    assert "| 2m | wiki | 1.8000 | measured | 1.5000 | a | 1.200 |" in out


def test_parse_cpuinfo():
    text = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse avx2 fma avx512f avx512_bf16 amx_bf16\n"
    info = core.parse_cpuinfo(text + text.replace("Some", "Other"))
    assert info == dict(model="Some CPU", flags=["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"])

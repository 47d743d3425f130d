"""The interactive commands driven as a person would, through a pseudo-terminal (pexpect): the
config editor, the generation REPL and guided mode; and the training display through a pipe."""

import fcntl
import io
import math
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pexpect
import pytest
from conftest import private_cache, random_corpus
from pexpect.fdpexpect import fdspawn
from rich.console import Console

from pufferfish_jax.config import apply_overrides, defaults, flatten, load_file, validate
from pufferfish_jax.configure import KEYS
from pufferfish_jax.data.tokenizer import train_tokenizer
from pufferfish_jax.model.spec import ModelSpec
from pufferfish_jax.train import checkpoint
from pufferfish_jax.display import SPARK_LEVELS, History, TrainDisplay, moe_summary, sparkline
from pufferfish_jax.sharding import single_device_mesh
from pufferfish_jax.train.state import create_state, make_optimizer

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 120  # seconds per expected output: generous, the CPU is shared with other test runs
STATS = r"\((\d+) tokens in [\d.]+s, seed (\d+)\)"


@pytest.fixture(scope="module")
def env(tmp_path_factory, session_cache):
    # TERM=dumb: a terminal (so the commands are interactive) without colours, for plain matching.
    cache = private_cache(tmp_path_factory.mktemp("cache"), session_cache)
    return {**os.environ, "PUFFERFISH_CACHE": str(cache), "PYTHONPATH": str(ROOT),
            "TERM": "dumb", "COLUMNS": "200", "LINES": "60"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return random_corpus(tmp_path_factory.mktemp("text") / "words.txt")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, corpus) -> Path:
    """An untrained 1-layer model with a real tokenizer, saved as a run would save it; a large init
    std makes its samples depend visibly on temperature and seed."""
    tokenizer = train_tokenizer(corpus.read_text().split("\n\n")[:200], vocab_size=300)
    cfg = apply_overrides(defaults(), ["steps=1", f"model.vocab_size={tokenizer.get_vocab_size()}", "model.seq_len=64",
                                       "model.num_layers=1", "model.d_model=32", "model.num_heads=2",
                                       "model.num_kv_heads=1", "model.init_std=0.5"])
    spec = ModelSpec.from_config(cfg.model)
    state = create_state(spec, make_optimizer(cfg.train), 0, single_device_mesh())
    run_dir = tmp_path_factory.mktemp("run")
    manager = checkpoint.open_manager(run_dir / "checkpoints", keep=1)
    checkpoint.save(manager, state, cfg, tokenizer.to_str(), {"step": 0, "elapsed_s": 0.0})
    manager.wait_until_finished()
    manager.close()
    return run_dir


def _spawn(args, env) -> fdspawn:
    """The command on a fresh pseudo-terminal (60 x 200). subprocess starts it (fork and exec in C),
    not pexpect.spawn's fork from Python, which is unsafe once JAX's threads run in this process."""
    main_fd, terminal_fd = pty.openpty()
    fcntl.ioctl(terminal_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 200, 0, 0))
    process = subprocess.Popen([sys.executable, "-m", "pufferfish_jax", *args], cwd=ROOT, env=env, stdin=terminal_fd,
                               stdout=terminal_fd, stderr=terminal_fd, start_new_session=True)
    os.close(terminal_fd)
    child = fdspawn(main_fd, encoding="utf-8", timeout=TIMEOUT)
    child.process = process
    return child


def _finish(child: fdspawn) -> int:
    """Waits for the end of output and returns the exit code."""
    child.expect(pexpect.EOF)
    child.close()
    return child.process.wait(timeout=TIMEOUT)


# The config editor.

def _edit(child: fdspawn, line: str, reply) -> None:
    """Types a line at the editor's prompt and waits for `reply` (a regex, or pexpect.EOF)."""
    child.expect_exact("configure> ")
    child.sendline(line)
    child.expect(reply)


@pytest.mark.slow  # the real command on a pseudo-terminal
def test_editor_edits_refuses_with_reasons_and_saves_a_loadable_config(env, tmp_path):
    child = _spawn(["configure"], env)
    child.expect("help")  # the table and the commands are shown first
    # A row number asks for the value.
    _edit(child, str(KEYS.index("model.d_model") + 1), r"model\.d_model \[256\]: ")
    child.sendline("384")
    child.expect_exact("model.d_model: 256 -> 384")
    # Bad values are refused inline, with the validator's reason, and change nothing.
    _edit(child, "d_model=abc", r"refused: model\.d_model='abc': expected int")
    _edit(child, "d_model=100", r"refused: model\.num_heads=8 must divide model\.d_model=100")
    _edit(child, "model.dtype=float16", r"refused: model\.dtype='float16': expected one of bfloat16 \| float32")
    _edit(child, "model.num_layer=3", r"refused: unknown config key 'model\.num_layer' \(did you mean model\.num_layers")
    _edit(child, "vocab_size=512", r"refused: 'vocab_size' is ambiguous")
    _edit(child, "budget=5m steps=100", r"refused: budget\.time and train\.steps are both set")
    # Several keys at once, so a combination that only works together can be entered.
    _edit(child, "d_model=96 model.num_heads=6 num_kv_heads=3 train.lr=1e-3 budget=90s",
          r"budget\.time: '' -> '90s'")
    py_path, json_path = tmp_path / "mine.py", tmp_path / "sub" / "mine.json"
    _edit(child, f"save {tmp_path / 'mine.txt'}", r"refused: .*must end in \.py")
    _edit(child, f"save {py_path}", r"saved ")
    _edit(child, f"save {json_path}", r"saved ")
    _edit(child, "num_layers=2", r"model\.num_layers: 4 -> 2")
    _edit(child, "quit", r"unsaved changes")  # the first quit warns about the unsaved edit
    child.expect_exact("configure> ")
    child.sendline("quit")
    assert _finish(child) == 0

    from_py, from_json = flatten(load_file(py_path)), flatten(load_file(json_path))
    assert from_py == from_json
    expected = flatten(apply_overrides(defaults(), ["model.d_model=96", "model.num_heads=6", "model.num_kv_heads=3",
                                                    "train.lr=1e-3", "budget.time=90s"]))
    assert from_py == expected  # everything else at its default, the unsaved num_layers=2 not written
    validate(load_file(py_path))


@pytest.mark.slow  # planning prepares the data and compiles the model
def test_editor_starts_from_a_file_and_shows_a_plan(env, tmp_path, corpus):
    start = tmp_path / "start.json"
    start.write_text('{"data": {"corpus": "%s", "vocab_size": 300}, "model": {"num_layers": 1, "d_model": 32, '
                     '"num_heads": 2, "num_kv_heads": 1, "seq_len": 32}, "budget": {"planner": "none"}}' % corpus)
    child = _spawn(["configure", str(start), "train.batch_size=8"], env)
    _edit(child, "plan", r"refused: plan needs a budget")
    _edit(child, "plan 2m", r"batch\s+.\s+8 x 32 tokens")  # the plan table, with the edited batch
    _edit(child, "reset batch_size", r"train\.batch_size: 8 -> 16")
    _edit(child, "save", rf"{re.escape(str(start))} exists; overwrite it\? \[y/N\] ")
    child.sendline("y")
    child.expect("saved ")
    _edit(child, "quit", pexpect.EOF)
    saved = flatten(load_file(start))
    assert saved["model.d_model"] == 32 and saved["train.batch_size"] == 16 and saved["data.corpus"] == str(corpus)


# The generation REPL.

def _turn(child: fdspawn, prompt: str) -> tuple[str, int, int]:
    """Sends a prompt; returns (everything printed for it, tokens written, seed used)."""
    child.expect_exact("> ")
    child.sendline(prompt)
    child.expect(STATS)
    return child.before, int(child.match.group(1)), int(child.match.group(2))


def _command(child: fdspawn, line: str, reply: str) -> None:
    child.expect_exact("> ")
    child.sendline(line)
    child.expect(reply)


@pytest.mark.slow  # the real command on a pseudo-terminal
def test_repl_commands_change_sampling(env, tiny_checkpoint):
    child = _spawn(["generate", str(tiny_checkpoint)], env)
    child.expect("/help lists the commands")
    _command(child, "/max 12", "max 12")
    first, count, seed0 = _turn(child, "the river")
    second, _, seed1 = _turn(child, "the river")
    assert count == 12 and seed1 == seed0 + 1
    assert first != second  # each turn samples with the next seed
    _command(child, "/temp 0", "temp 0,")
    greedy = [_turn(child, "the river")[0] for _ in range(2)]
    assert greedy[0] == greedy[1]  # greedy ignores the seed
    _command(child, "/temp 1", "temp 1,")
    _command(child, "/seed 7", "seed 7")
    seven, _, seed = _turn(child, "the river")
    assert seed == 7
    _command(child, "/seed 7", "seed 7")
    assert _turn(child, "the river")[0] == seven  # /seed restarts the sequence: the session replays
    _command(child, "/seed 8", "seed 8")
    assert _turn(child, "the river")[0] != seven
    _command(child, "/max 5", "max 5")
    text, count, _ = _turn(child, "the river")
    assert count == 5
    _command(child, "/topk 1", "top-k 1,")  # top-k 1 is greedy whatever the temperature
    assert _turn(child, "the river")[0] == _turn(child, "the river")[0] != text
    assert _finish_repl(child) == 0


def _finish_repl(child: fdspawn) -> int:
    child.expect_exact("> ")
    child.sendline("/quit")
    return _finish(child)


@pytest.mark.slow  # the real command on a pseudo-terminal
def test_repl_bad_commands_get_a_reason_and_the_session_goes_on(env, tiny_checkpoint):
    child = _spawn(["generate", str(tiny_checkpoint), "--max-new-tokens", "4"], env)
    for line, reason in [("/temp hot", r"/temp hot: expected a number >= 0"), ("/topp 1.5", r"top-p 1\.5 must be in"),
                         ("/max 64", r"max new tokens 64 must be between 1 and 63"), ("/max", r"/max needs a whole number"),
                         ("/volume 11", r"unknown command /volume; /help lists the commands"),
                         ("the " * 70, r"the prompt is \d+ tokens and the continuation 4, more than .*shorten the prompt")]:
        _command(child, line, "error: " + reason)
    _command(child, "/help", r"/seed N")
    assert _turn(child, "the river")[1] == 4  # the settings survived the bad commands
    assert _finish_repl(child) == 0


# Guided mode.

@pytest.mark.slow  # the real command
def test_no_arguments_without_a_terminal_prints_usage_and_never_prompts(env):
    result = subprocess.run([sys.executable, "-m", "pufferfish_jax"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2
    assert "usage:" in result.stderr and "configure" in result.stderr
    assert result.stdout == ""


@pytest.mark.slow  # plans twice and trains
def test_guided_mode_from_data_to_writing(env, corpus, tmp_path):
    child = _spawn([], env)
    child.expect_exact("data [1]: ")
    child.sendline("/no/such/place.txt")
    child.expect("no such file or folder")
    child.expect_exact("data [1]: ")
    child.sendline(str(corpus))
    child.expect_exact("budget [5m]: ")
    child.sendline("soon")
    child.expect("refused: budget 'soon' is not a duration")
    child.expect_exact("budget [5m]: ")
    child.sendline("1m")
    child.expect(r"steps\s+.\s+[\d,]+ \(re-fitted to the clock")  # the measured plan for the budget
    child.expect_exact("[q]uit [t]: ")
    child.sendline("e")  # into the editor: a tiny fixed-step run instead, so the test stays short
    _edit(child, f"budget= steps=6 num_layers=1 d_model=32 num_heads=2 num_kv_heads=1 seq_len=32 "
                 f"data.vocab_size=300 run_dir={tmp_path / 'run'}", r"train\.run_dir: '' -> ")
    _edit(child, "done", r"steps\s+.\s+6\s")  # back to the plan, now for the edited config
    child.expect_exact("[q]uit [t]: ")
    child.sendline("t")
    child.expect(r"The same run from the command line: just train .*steps=6")
    child.expect(r"final: val loss")
    child.expect_exact("Write with the model now? [Y/n]: ")
    child.sendline("")
    child.expect_exact("> ")
    child.sendline("the river")
    child.expect(STATS)
    child.expect_exact("> ")
    child.sendline("/quit")
    assert _finish(child) == 0
    assert (tmp_path / "run" / "checkpoints" / "6").is_dir()


# The training display through a pipe.

@pytest.mark.slow
def test_piped_training_output_is_plain_lines(env, corpus, tmp_path):
    """`just train ... | cat` must show progress lines and no terminal control codes. The config is
    written by the editor, so this also checks that a saved config trains."""
    config = tmp_path / "tiny.py"
    child = _spawn(["configure"], env)
    _edit(child, f"data.corpus={corpus} data.vocab_size=300 num_layers=1 d_model=32 num_heads=2 num_kv_heads=1 "
                 "seq_len=32 steps=20 log_every=5", r"train\.log_every: 10 -> 5")
    _edit(child, f"save {config}", "saved ")
    _edit(child, "quit", pexpect.EOF)
    result = subprocess.run(f"just train config={config} run_dir={tmp_path / 'run'} | cat", shell=True, cwd=ROOT,
                            env={**{k: v for k, v in env.items() if k not in ("COLUMNS", "LINES")}, "TERM": "xterm-256color"},
                            capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout.decode()
    assert b"\x1b" not in result.stdout and b"\r" not in result.stdout
    progress = re.findall(r"^step (\d+)/20  loss [\d.]+  [\d,]+ tok/s  MFU [\d.]+%  mem .*$", out, re.MULTILINE)
    assert [int(s) for s in progress] == [5, 10, 15, 20], out
    assert "final: val loss" in out


# The display's pieces, in-process.

def test_sparkline_scales_between_min_and_max_and_fits_its_width():
    line = sparkline([float(v) for v in range(100)], width=20)
    assert len(line) == 20 and line[0] == SPARK_LEVELS[0] and line[-1] == SPARK_LEVELS[-1]
    assert list(line) == sorted(line, key=SPARK_LEVELS.index)  # a rising series never dips
    assert sparkline([3.0, math.nan, 3.0]) == SPARK_LEVELS[0] * 2 and sparkline([]) == ""


def test_history_stays_bounded_and_keeps_the_whole_run():
    history = History(capacity=16)
    values = [float(v) for v in range(1000)]
    for v in values:
        history.add(v)
    assert len(history.values) < 16
    # Each point is the mean of one block of `stride` consecutive steps, blocks tiling the run from
    # its start: for the series 0, 1, 2, ... the points are (stride - 1) / 2 + k * stride.
    stride = history.values[1] - history.values[0]
    assert stride > 1 and history.values == [(stride - 1) / 2 + k * stride for k in range(len(history.values))]
    assert len(history.values) * stride <= len(values) < (len(history.values) + 2) * stride  # the whole run


def test_moe_summary_names_the_extreme_layers():
    phrases = moe_summary({"moe.0.max_load": 1.2, "moe.1.max_load": 2.0, "moe.2.max_load": 1.0, "moe.aux": 0.5})
    assert "max_load mean 1.4, min 1 (layer 2), max 2 (layer 1)" in phrases and "aux 0.5" in phrases


def test_display_without_a_terminal_prints_plain_lines():
    out = io.StringIO()
    console = Console(file=out, width=300)  # a file: not a terminal
    display = TrainDisplay(console, 20, time.time(), None, 5, tokens_per_step=512, flops_per_token=1e6,
                           peak_flops=1e12, peak_source="data-sheet peak")
    display.observe_moe({"moe.0.dropped": 0.25, "moe.1.dropped": 0.5})
    for step in range(1, 21):
        display.update(step, 20, 4.0 - step / 10, 1000.0)
    display.record_eval(20, 2.5, 1.2)
    display.close()
    lines = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue() and "\r" not in out.getvalue()
    assert [line.split()[1] for line in lines[:4]] == ["5/20", "10/20", "15/20", "20/20"]
    assert "loss 2.000  1,000 tok/s  MFU 0.1%" in lines[3]  # 1000 tok/s x 1 MFLOP/token over 1 TFLOP/s
    assert "dropped mean 0.375" in lines[3] and lines[4] == "step 20: val loss 2.500, val bpb 1.200"

"""Shared pytest setup: the repo root importable however pytest is launched; the synthetic corpora
the tests write; one cache and one tiny trained run dir per session; running the real command."""

import fcntl
import importlib.util
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# `just` exports the time it started as PUFFERFISH_T0 so that a budget counts from there; under
# `just test` that is the start of the whole suite, which would charge every budgeted run in a test
# with the tests before it. Each test starts its own clock.
os.environ.pop("PUFFERFISH_T0", None)

# Compiling is most of the suite's time, and LLVM's optimizations are not what it tests: without
# them XLA compiles about twice as fast and computes the same values. XLA's newer fusion emitters
# (MLIR) cost as much again as the older elemental ones: a tiny MoE train step compiled in 2.3 s
# with them and 1.0 s without. Set before jax is imported, so it holds in this process and in every
# subprocess a test starts (they inherit the environment).
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

# One persistent compilation cache for the whole run, shared by both workers and every subprocess
# (they inherit the environment; `session.use_compilation_cache` defers to JAX's own setting): the
# same tiny programs are compiled by many tests, and a cache hit replaces a compile. Named by the
# run's id, so that a run never reads what an earlier one wrote and the suite's time is a clean
# clone's; removed when the run ends (`pytest_unconfigure`).
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"solo-{os.getpid()}"
JAX_CACHE = Path(tempfile.gettempdir()) / f"pufferfish-tests-{_RUN_ID}" / "jax"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(JAX_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# The suite runs on as many pytest workers as there are cores (`just test`), so each worker's own
# JAX computes on one thread: two XLA pools per core spin against each other (the fast suite took
# 183 CPU-s with the pools and 137 without, on 2 cores). The backend reads the flag once, when it
# starts, so it starts here and the flag is dropped again: the training runs tests start as
# subprocesses keep XLA's threads (single-threaded, the full suite's CPU time grew from 504 s to
# 578 s).
_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
_flags = os.environ["XLA_FLAGS"]
os.environ["XLA_FLAGS"] = f"{_flags} {_ONE_THREAD}"
import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"] or None)
jax.devices()
os.environ["XLA_FLAGS"] = _flags


def pytest_unconfigure(config):
    if "PYTEST_XDIST_WORKER" not in os.environ:  # the controller, after every worker has finished
        shutil.rmtree(JAX_CACHE.parent, ignore_errors=True)


# The files that cost the most CPU (measured with `just test`, heaviest first), started first: with
# one worker per core the suite ends when the last file does, and a heavy file started last left
# the other core idle for a minute. Files not named keep their order and fill in after these.
HEAVY_FIRST = ("test_resume.py", "test_moe.py", "test_end_to_end.py", "test_interactive.py", "test_mesh.py",
               "test_bad_inputs.py", "test_pipeline.py", "test_recipe.py", "test_model.py", "test_export.py",
               "test_generate.py", "test_kernels.py", "test_train_batches.py", "test_checkpoint.py",
               "test_blocked_attention.py")


def pytest_collection_modifyitems(config, items):
    """Heaviest files first (xdist's loadfile hands out files in this order with
    --no-loadscope-reorder, which the justfile passes)."""
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FIRST)))  # stable: order within a file kept


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains (in a subprocess, through the CLI or a pipeline), runs the real commands "
                                       "end to end, or compiles many programs; `just test` runs them, `just test-fast` "
                                       "leaves them out")


# ----------------------------------------------------------------------------- synthetic corpora
# Structured text: every sentence is a rotation of one fixed word order, so a model learns it fast
# and its loss falls within a few dozen steps.
STORY = ("the river ran past the old mill and the miller sang of bread and stone while children "
         "played by the water under a grey sky and the town slept through the long winter night").split()
# Random text: sentences of words drawn at random, for tests that need a vocabulary, not structure.
WORDS = ["the", "a", "small", "fish", "swims", "under", "old", "bridge", "while", "river", "light", "moves",
         "slowly", "across", "green", "stones", "and", "children", "watch", "from", "distant", "hills",
         "where", "quiet", "birds", "sing", "about", "morning", "rain"]


def story_text(sentences: int, offset: int = 0) -> str:
    """`sentences` lines of the structured text, a blank line (a paragraph break) after every 12th."""
    lines = []
    for i in range(offset, offset + sentences):
        start = (i * 7) % len(STORY)
        words = STORY[start:] + STORY[:start]
        lines.append(" ".join(words[: 8 + i % 9]).capitalize() + ".")
        if i % 12 == 11:
            lines.append("")
    return "\n".join(lines)


def story_corpus(path: Path, sentences: int = 3000, offset: int = 0) -> Path:
    path.write_text(story_text(sentences, offset))
    return path


def sentences(seed: int, n: int) -> str:
    """n random sentences of 5 to 12 words, the same for the same seed."""
    rng = random.Random(seed)
    return " ".join(" ".join(rng.choices(WORDS, k=rng.randint(5, 12))).capitalize() + "." for _ in range(n))


def random_corpus(path: Path, documents: int = 600) -> Path:
    """A .txt corpus of `documents` random paragraphs (blank-line separated, about 50 words each)."""
    path.write_text("\n\n".join(sentences(i, 6) for i in range(documents)))
    return path


# ----------------------------------------------------------------------------- the tools
def load_tool(name: str):
    """tools/NAME.py as a module (tools/ is no package). Registered under its name, because the
    benchmark tools import each other by name (bench_recipe imports bench_planner_core)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- the real command
def run_command(args, env, timeout=300) -> subprocess.CompletedProcess:
    """`python -m pufferfish_jax ARGS` from the repo root, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "pufferfish_jax", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def budget_hint(stderr: str) -> int | None:
    """The budget the planner asks for when it refuses one as too small for this machine, else None."""
    found = re.search(r"try budget=(\d+)s", stderr)
    return int(found.group(1)) if found else None


def fitted_budget(args, budget_s: int, env) -> int:
    """`budget_s`, or what the planner asks for on this machine when that is too small. It runs
    `plan` with the same args, so the calibration and compilation caches in env's PUFFERFISH_CACHE
    are warm for the run that follows: a budgeted test must not fail on a slower CPU."""
    result = run_command(["plan", f"budget={budget_s}s", *args], {**env, "PUFFERFISH_T0": repr(time.time())})
    if result.returncode == 0:
        return budget_s
    need = budget_hint(result.stderr)
    assert need, result.stderr[-3000:]
    return need


# ----------------------------------------------------------------------------- shared per session


@pytest.fixture(scope="session")
def command_env(session_cache) -> dict:
    """The environment for `run_command` and other subprocesses of the package."""
    return {**os.environ, "PUFFERFISH_CACHE": str(session_cache), "PYTHONPATH": str(ROOT)}


def once_per_run(tmp_path_factory, name: str, make) -> Path:
    """`make(path)` by whichever pytest worker asks first; the others wait for it and share `path`.
    A session fixture is made once per worker (each has its own session), and training the shared
    run twice cost one worker a whole training run."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's folder, all workers'
    path, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            make(path)
            done.touch()
    return path


def _measure_matmul_peaks(cache: Path, probes: int) -> None:
    """This machine's matmul peaks (the MFU denominator and the planner's prior) into `cache`,
    measured in a fresh process as a training run measures them: with XLA's own threads, which
    this worker's JAX runs without. `probes` probes of each dtype at once: all PEAK_PROBES where
    the suite trains, so that no training run spends its seconds on another; one for the fast
    suite, which trains nothing and ends before a second probe would be due."""
    measure = ("import sys; from pufferfish_jax.budget.calibrate import CalibrationCache, DTYPES; "
               "cache = CalibrationCache(sys.argv[1]); "
               f"[cache.matmul_rate(d, fresh=True) for _ in range({probes}) for d in DTYPES]")
    subprocess.run([sys.executable, "-c", measure, str(cache)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                   check=True, capture_output=True, timeout=300)


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory, request) -> Path:
    """One PUFFERFISH_CACHE for the whole run, shared by both workers: a token cache, tokenizer or
    measured step time made by one test is read back by the next, in any worker or subprocess
    (every write to the cache is atomic, as it must be for two users' runs sharing ~/.cache). It
    starts with the machine's matmul peaks, which `private_cache` hands on."""
    from pufferfish_jax.budget.calibrate import PEAK_PROBES

    probes = 1 if "not slow" in request.config.getoption("markexpr") else PEAK_PROBES
    return once_per_run(tmp_path_factory, "cache", lambda path: _measure_matmul_peaks(path, probes))


def private_cache(path: Path, session_cache: Path) -> Path:
    """A PUFFERFISH_CACHE of a test's own (one that looks inside its cache, or must not share its
    data), starting with the session's calibration: each fresh cache would otherwise measure the
    matmul peaks again, 2 CPU-s in every process that trains with it. (A device with a data-sheet
    peak measures none, and there is nothing to copy.)"""
    path.mkdir(parents=True, exist_ok=True)
    if (session_cache / "calibration.json").exists():
        shutil.copyfile(session_cache / "calibration.json", path / "calibration.json")
    return path


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """The structured corpus as a file (1500 sentences, about 60 KB)."""
    return once_per_run(tmp_path_factory, "corpus", lambda d: story_corpus(d / "story.txt", sentences=1500)) / "story.txt"


# The tiny model every shared run uses: one layer, d 32, sequences of 32 tokens.
TINY_MODEL = ["data.vocab_size=300", "model.num_layers=1", "model.d_model=32", "model.num_heads=2",
              "model.num_kv_heads=1", "model.seq_len=32", "train.batch_size=4"]
TINY_STEPS = 8


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, session_cache, corpus_file) -> Path:
    """ONE tiny finished run dir (8 fixed steps through the CLI), made once per test run by the
    first worker that needs it, for every test that only needs some trained checkpoint. Read it,
    never change it: a test that damages or extends a run takes `trained_run_copy`."""
    from pufferfish_jax.cli import main

    def train(folder: Path) -> None:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PUFFERFISH_CACHE", str(session_cache))
            assert main(["train", f"steps={TINY_STEPS}", f"data.corpus={corpus_file}", *TINY_MODEL,
                         "train.log_every=4", f"run_dir={folder / 'run'}"]) == 0

    return once_per_run(tmp_path_factory, "trained", train) / "run"


@pytest.fixture
def trained_run_copy(trained_run, tmp_path) -> Path:
    """A private copy of the shared trained run, free to damage or resume."""
    return Path(shutil.copytree(trained_run, tmp_path / "trained"))


# ----------------------------------------------------------------------------- a local package index
class FakeIndex:
    """A PEP 503 index on localhost (the tests run offline): `publish` puts an archive on a project
    page, `requests` lists every path asked for, in order."""

    def __init__(self, root: Path, url: str, requests: list):
        self.root, self.url, self.requests = root, url, requests

    def publish(self, project: str, archive: Path, fragment: str | None = None) -> None:
        """Links `archive` from the project page; `fragment` (default: its real sha256) is what the
        page claims its hash is."""
        import hashlib

        files = self.root / "files"
        files.mkdir(exist_ok=True)
        shutil.copy(archive, files / archive.name)
        fragment = fragment or hashlib.sha256(archive.read_bytes()).hexdigest()
        page = self.root / "simple" / project
        page.mkdir(parents=True, exist_ok=True)
        (page / "index.html").write_text(f'<html><body><a href="../../files/{archive.name}#sha256={fragment}">'
                                         f"{archive.name}</a></body></html>")


@pytest.fixture
def fake_index(tmp_path, monkeypatch):
    """A FakeIndex served over HTTP from a thread, and PIP_INDEX_URL pointing at it."""
    import functools
    import http.server
    import threading

    root, requests = tmp_path / "index", []
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    index = FakeIndex(root, f"http://127.0.0.1:{server.server_address[1]}/simple/", requests)
    monkeypatch.setenv("PIP_INDEX_URL", index.url)
    yield index
    server.shutdown()
    server.server_close()

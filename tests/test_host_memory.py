"""host_memory: when the huge-page tunable applies, that the command re-runs itself with it, and
that it stops XLA's per-call temporary buffer from being faulted in 4 KiB at a time."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from pufferfish_jax.host_memory import RERUN_SENTINEL, TUNABLE, huge_page_env

THP_MADVISE = "always [madvise] never"


def test_tunable_added_only_where_it_helps_and_is_not_set():
    assert huge_page_env({"A": "1"}, "glibc 2.36", THP_MADVISE) == {"A": "1", "GLIBC_TUNABLES": TUNABLE}
    assert huge_page_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "glibc 2.35", THP_MADVISE) == {
        "GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{TUNABLE}"}
    assert huge_page_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "glibc 2.36", THP_MADVISE) is None  # user's
    assert huge_page_env({}, "glibc 2.31", THP_MADVISE) is None  # no such tunable before 2.35
    assert huge_page_env({}, "", THP_MADVISE) is None  # musl and others
    assert huge_page_env({}, "glibc 2.36", "always madvise [never]") is None  # kernel allows none
    assert huge_page_env({}, "glibc 2.36", "[always] madvise never") is None  # kernel gives them unasked


def _run(code: str, *args: str, env: dict) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=True)
    return out.stdout.strip().splitlines()


def test_rerun_keeps_the_command_line_and_the_earliest_start():
    code = textwrap.dedent("""
        import json, os, sys
        from pufferfish_jax.host_memory import rerun_with_huge_pages
        print(json.dumps([os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], os.environ.get("PUFFERFISH_T0")]))
        rerun_with_huge_pages(200.0)
    """)
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | {"PUFFERFISH_T0": "150.5"}
    runs = [json.loads(line) for line in _run(code, "train", "budget=1m", env=env)]
    if huge_page_env(env) is None:  # this machine: nothing to gain, so no second run
        assert runs == [[None, ["train", "budget=1m"], "150.5"]]
    else:
        assert runs == [[None, ["train", "budget=1m"], "150.5"], [TUNABLE, ["train", "budget=1m"], "150.5"]]


def test_rerun_is_one_shot_when_a_wrapper_strips_the_tunable(tmp_path):
    """The re-run goes through a wrapper that unsets GLIBC_TUNABLES (as a secure-exec loader or a
    site script might): without the sentinel every start would re-run again, forever. Here the
    tunable is made to look helpful on any machine, and a runaway is cut off after 5 starts."""
    wrapper = tmp_path / "python-wrapper"
    wrapper.write_text(f"#!/bin/sh\nunset GLIBC_TUNABLES\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    starts = tmp_path / "starts"
    code = textwrap.dedent(f"""
        import os, sys
        from pufferfish_jax import host_memory
        with open({str(starts)!r}, "a") as f:
            f.write(f"{{os.getpid()}} {{os.environ.get('GLIBC_TUNABLES')}} {{os.environ.get(host_memory.RERUN_SENTINEL)}}\\n")
        if len(open({str(starts)!r}).readlines()) >= 5:
            sys.exit(3)  # a loop: stop it here rather than let it spin
        real = host_memory.huge_page_env
        host_memory.huge_page_env = lambda env: real(env, "glibc 2.36", "always [madvise] never")
        sys.executable = {str(wrapper)!r}  # the re-run goes through the wrapper
        host_memory.rerun_with_huge_pages(0.0)
        print("ran")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", RERUN_SENTINEL)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    lines = starts.read_text().splitlines()
    assert out.returncode == 0 and out.stdout.strip() == "ran", (out.stderr[-2000:], lines)
    first, second = (line.split() for line in lines)  # exactly one re-run: two starts
    assert first[0] == second[0]  # the same process, replaced by exec
    assert first[1:] == ["None", "None"] and second[1:] == ["None", "1"]  # the wrapper stripped the tunable


@pytest.mark.slow  # jax in a fresh process, twice
def test_huge_pages_cut_the_page_faults_of_a_large_temporary():
    code = textwrap.dedent("""
        import json, resource
        import jax, jax.numpy as jnp
        x = jnp.ones((2048, 1024), jnp.float32)
        w = jnp.ones((1024, 8192), jnp.float32)
        f = jax.jit(lambda x, w: jnp.sum(jnp.tanh(x @ w), axis=0))  # a 64 MiB temporary per call
        for _ in range(2):
            f(x, w).block_until_ready()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(3):
            out = f(x, w).block_until_ready()
        print(json.dumps({"faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3,
                          "checksum": float(out.sum())}))
    """)
    plain = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    default = json.loads(_run(code, env=plain)[-1])
    assert default["checksum"] == 2048 * 8192  # tanh(1024) is 1.0 in float32
    tuned = huge_page_env(plain)
    if tuned is None:  # this machine: no tunable to compare (old glibc, or the kernel decides alone)
        return
    pages = 2048 * 8192 * 4 / 4096
    assert default["faults"] > 0.5 * pages, default  # glibc maps and unmaps the temporary every call
    huge = json.loads(_run(code, env=tuned)[-1])
    assert huge["checksum"] == default["checksum"]
    assert huge["faults"] < 0.25 * default["faults"], (huge, default)

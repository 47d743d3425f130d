"""`python -m pufferfish_jax ...`: the start time is taken before any heavy import, because the
budget covers the whole command (the justfile passes an even earlier one in PUFFERFISH_T0), and
the command re-runs itself once with huge pages for XLA's buffers (see host_memory)."""

import time

STARTED_AT = time.time()

if __name__ == "__main__":
    import sys

    from pufferfish_jax.host_memory import rerun_with_huge_pages

    rerun_with_huge_pages(STARTED_AT)
    from pufferfish_jax.cli import main

    sys.exit(main(sys.argv[1:], started_at=STARTED_AT))

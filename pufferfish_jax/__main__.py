"""`python -m pufferfish_jax ...` and the `pufferfish` console script.

The start time is taken before any heavy import, because the budget covers the whole command (the
justfile passes an even earlier one in PUFFERFISH_T0), and the command re-runs itself once with
huge pages for XLA's buffers (see host_memory) before it imports the library, so the re-run does
not pay for those imports twice: hence the import inside `entry_point`.
"""

import sys
import time

from pufferfish_jax.host_memory import rerun_with_huge_pages

STARTED_AT = time.time()


def entry_point(started_at: float | None = None) -> None:
    started_at = started_at or time.time()
    rerun_with_huge_pages(started_at)
    from pufferfish_jax.cli import main

    sys.exit(main(sys.argv[1:], started_at=started_at))


if __name__ == "__main__":
    entry_point(STARTED_AT)

"""`python -m pipelines CONFIG.py [key=value ...] [--debug]` (`just pipeline ...`).

The start time is taken before any heavy import: a budget counts from the start of the command.
The command re-runs itself once with huge pages for XLA's buffers (see pufferfish_jax.host_memory)
before it imports anything heavy, so the re-run does not pay for those imports twice.
"""

import time

STARTED_AT = time.time()

if __name__ == "__main__":
    import sys

    from pufferfish_jax.host_memory import rerun_with_huge_pages

    rerun_with_huge_pages(STARTED_AT)
    from pipelines.command import main

    sys.exit(main(sys.argv[1:], started_at=STARTED_AT))

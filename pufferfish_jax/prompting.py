"""Plain line input for the interactive commands (config editor, guided mode, generation REPL).

Line input rather than a full-screen UI: it works over SSH, in tmux, with a screen reader, and
under a test driving a pseudo-terminal, and needs no mouse. readline, where the platform has it,
adds line editing and history to input() at no cost.
"""

from __future__ import annotations

import sys


def enable_line_editing() -> None:
    try:
        import readline  # noqa: F401  (importing it is what enables editing in input())
    except ImportError:
        pass


def is_interactive() -> bool:
    """A person at a terminal: both ends of the conversation are a TTY."""
    return sys.stdin.isatty() and sys.stdout.isatty()

"""The ``axnet`` command, and ``python -m axnet``.

Ctrl-C while the command is still loading (its imports take a good part
of a second on a busy machine) ends it as Ctrl-C does later: status 130
and no traceback.
"""

from __future__ import annotations

#: Status after Ctrl-C, as a shell reports a command that SIGINT ended.
EXIT_INTERRUPTED = 130


def main() -> int:
    try:
        from ._cli import main as cli

        return cli()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED

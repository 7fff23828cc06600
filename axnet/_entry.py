"""The ``axnet`` command, and ``python -m axnet``.

Ctrl-C while the command is still loading (its imports take a good part
of a second on a busy machine) ends it as Ctrl-C does later: status 130
and no traceback.  So does running out of memory (a low ``ulimit -v``):
status 1 and what to raise.
"""

from __future__ import annotations

import sys

#: Status after Ctrl-C, as a shell reports a command that SIGINT ended.
EXIT_INTERRUPTED = 130


def main() -> int:
    try:
        from ._cli import main as cli

        return cli()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except MemoryError:
        print(
            "axnet: out of memory; a limit on its size (ulimit -v) is too low: raise it",
            file=sys.stderr,
        )
        return 1

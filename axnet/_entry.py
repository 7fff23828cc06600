"""The ``axnet`` command, and ``python -m axnet``.

Ctrl-C while the command is still loading (its imports take a good part
of a second on a busy machine) ends it as Ctrl-C does later: status 130
and no traceback.  So does running out of memory under a low ``ulimit -v``
while loading or later: status 1 and what to raise.
"""

from __future__ import annotations

import errno
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
    except (ImportError, OSError, SystemError) as exc:
        # SystemError: CPython's compiler, out of memory while it compiles a
        # module (no bytecode cache), can fail so instead of MemoryError.
        ours = not isinstance(exc, OSError) or exc.errno == errno.ENOMEM
        if not (ours and _memory_limited()):
            raise  # a broken installation, say: the traceback tells what is missing
        # A shared library that could not be mapped ("failed to map segment").
        print(
            f"axnet: cannot load its modules ({exc}); a limit on memory (ulimit -v) "
            "is set, and may be too low: raise it",
            file=sys.stderr,
        )
        return 1


def _memory_limited() -> bool:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return soft != resource.RLIM_INFINITY

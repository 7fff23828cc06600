# Types of the native hot path (_fastpath.c).
from collections.abc import Callable, Mapping
from typing import Any, Final

SLOW: Final[int]
DELIVER: Final[int]
CONNECTING: Final[int]
TIMEOUT: Final[int]
WAKE: Final[int]
WAITERS: Final[int]
HUP: Final[int]

#: (kind, fd, extra, id, pid, flags, nr, arch, instruction pointer, args);
#: extra: DELIVER (family, real port, peer), CONNECTING (the destination,
#: what connect() said: EINPROGRESS or EALREADY).
Handed = tuple[
    int,
    int,
    tuple[int, int, bytes] | tuple[bytes, int] | None,
    int,
    int,
    int,
    int,
    int,
    int,
    tuple[int, int, int, int, int, int],
]

class Fast:
    def __init__(
        self,
        fd: int,
        notif_size: int,
        resp_size: int,
        pidfds: dict[int, int],
        mems: dict[int, int],
        maps: dict[int, int],
        names: dict[int, bytes],
        inert: dict[int, bytes],
        pending: Mapping[int, object],
        sources: dict[bytes, bool],
        *,
        busy_poll_us: int = 0,
        adopt: Callable[[int, int], bool] | None = None,
        retired: dict[int, bytes] = ...,
        serving: dict[int, bytes] = ...,
    ) -> None: ...
    def serve(
        self,
        engine: Any,
        wake_fd: int,
        waiters_fd: int,
        timeout_ms: int,
        parked_timeout_ms: int,
        /,
    ) -> int | Handed: ...
    def drop_abandoned(self) -> int: ...
    def parked_tids(self) -> list[int]: ...
    def expire(self) -> int: ...
    def interrupt(self, tid: int, error: int, /) -> bool: ...
    def close(self) -> None: ...
    @property
    def counters(self) -> dict[str, int]: ...
    @property
    def parked(self) -> int: ...

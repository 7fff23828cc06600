"""Records as plain dictionaries: what ``--json`` prints and tables show."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._node import App
from ._table import AppRecord, ServiceRecord


def service_view(record: ServiceRecord) -> dict[str, Any]:
    return {
        "virtual": str(record.virtual),
        "real": str(record.real),
        "node": record.node,
        "app": record.app_id,
        "name": record.name,
        "labels": dict(record.labels),
    }


def app_view(
    record: AppRecord,
    local: App | None,
    services: Sequence[ServiceRecord] = (),
    more_blocks: Sequence[AppRecord] = (),
) -> dict[str, Any]:
    """An app; its listeners from the node when it runs here, else from
    *services*, the live service records it published (an app elsewhere);
    *more_blocks*, the records of its further client port blocks."""
    if local is not None:
        listening = sorted(str(v) for v, c in local.claims.items() if c.listening)
    else:
        listening = sorted(str(s.virtual) for s in services)
    return {
        "app": record.app_id,
        "vip": str(record.vip),
        "node": record.node,
        "name": record.name,
        "labels": dict(record.labels),
        "client_ports": ",".join(f"{r.port_lo}-{r.port_hi}" for r in (record, *more_blocks)),
        "pid": local.pid if local else None,
        "command": " ".join(local.argv) if local else None,
        "listening": listening,
    }

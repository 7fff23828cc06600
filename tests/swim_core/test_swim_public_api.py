"""The public surface of swim is what we think it is, and the core stays pure."""

from __future__ import annotations

import ast
from pathlib import Path

import swim

EXPECTED = {
    "Address",
    "Awareness",
    "AuthenticationError",
    "BroadcastQueue",
    "Config",
    "Datagram",
    "Delivered",
    "Event",
    "Keyring",
    "MAX_META_BYTES",
    "MAX_PACKET_BYTES",
    "MAX_PUSH_PULL_BYTES",
    "Member",
    "MemberAlive",
    "MemberDead",
    "MemberJoined",
    "MemberLeft",
    "MemberReaped",
    "NameConflict",
    "MemberState",
    "MemberSuspected",
    "MemberUpdated",
    "ProtocolError",
    "Rng",
    "StateDelegate",
    "Stats",
    "StreamPurpose",
    "StreamRequest",
    "Suspicion",
    "Swim",
    "UserMessage",
    "decode_envelope",
    "remaining_suspicion_time",
    "retransmit_limit",
    "suspicion_timeout",
}

FORBIDDEN = {"trio", "socket", "time", "random", "threading", "asyncio", "select"}


def test_public_surface() -> None:
    public = {n for n in vars(swim) if not n.startswith("_")} - {"testing", "annotations"}
    assert public == EXPECTED


def test_no_forbidden_imports() -> None:
    package = Path(swim.__file__).parent
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert not roots & FORBIDDEN, f"{path.name} imports {roots & FORBIDDEN}"

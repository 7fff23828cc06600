"""The daemon's gossip flags (pure): addresses, profile, key file, labels, validated."""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

import swim

from ._gossip_address import DEFAULT_PORT, ip_literal, parse_address
from ._gossip_codec import encode_meta
from ._table import Labels

log = logging.getLogger("axnet.gossip")

PROFILES: dict[str, Callable[[], swim.Config]] = {
    "lan": swim.Config.lan,
    "wan": swim.Config.wan,
    "local": swim.Config.local,
}


def load_keys(path: Path) -> tuple[bytes, ...]:
    """The keys of a ``--gossip-key-file``: base64, one a line, the first encrypts.

    Blank lines and lines starting with ``#`` are skipped.  Raises ValueError
    with the message for the user.
    """
    flag = f"--gossip-key-file {path}"
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not a text file"
        raise ValueError(f"{flag}: cannot read it: {reason}") from None
    keys: list[bytes] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{flag}, line {number}: not a base64 key") from None
        if len(key) not in (16, 24, 32):
            raise ValueError(
                f"{flag}, line {number}: a key must be 16, 24 or 32 bytes (AES-128, -192 "
                f"or -256), got {len(key)}"
            )
        keys.append(key)
    if not keys:
        raise ValueError(f"{flag}: the file holds no key; make one with 'axnet keygen'")
    return tuple(keys)


@attrs.frozen(kw_only=True)
class GossipOptions:
    """The daemon's gossip flags, validated."""

    bind: swim.Address
    advertise: swim.Address
    seeds: tuple[str, ...] = ()
    keys: tuple[bytes, ...] = ()
    profile: str = "lan"
    labels: Labels = ()


def _version(host: str) -> int:
    return ipaddress.ip_address(host).version


def _default_bind(advertise: str | None, address: str | None) -> str:
    """The wildcard of the family members reach this node in, at 7946: an
    IPv4 socket could neither receive from nor send to IPv6 members."""
    hint = advertise or address
    v6 = False
    if hint is not None:
        with contextlib.suppress(ValueError):
            host, _ = parse_address(hint, flag="--advertise", default_port=DEFAULT_PORT)
            v6 = ip_literal(host) and _version(host) == 6
    return f"[::]:{DEFAULT_PORT}" if v6 else f"0.0.0.0:{DEFAULT_PORT}"


def gossip_options(
    *,
    bind: str | None,
    advertise: str | None,
    join: Sequence[str] = (),
    key_file: Path | None = None,
    profile: str = "lan",
    address: str | None = None,
    labels: Labels = (),
) -> GossipOptions:
    """Validate the daemon's gossip flags; ValueError with the message for the user.

    The bind address defaults to the wildcard of the family of the advertised
    address (or ``--address``), at port 7946.  The advertised address
    defaults to the bind address, then, when that is a wildcard, to
    ``--address`` at the bind port.
    """
    bind_addr = parse_address(bind or _default_bind(advertise, address), flag="--bind")
    if not ip_literal(bind_addr[0]):
        raise ValueError(f"--bind must be an IP address, got {bind!r}")
    if advertise is not None:
        adv = parse_address(advertise, flag="--advertise", default_port=bind_addr[1])
        if not ip_literal(adv[0]):
            raise ValueError(f"--advertise must be an IP address, got {advertise!r}")
    elif not ipaddress.ip_address(bind_addr[0]).is_unspecified:
        adv = bind_addr
    elif address is not None:
        adv = (address, bind_addr[1])
    else:
        raise ValueError(
            f"--bind {bind_addr[0]} is a wildcard address: say with --advertise (or "
            "--address) which address other members reach this node at"
        )
    if adv[1] == 0 and bind_addr[1] != 0:
        raise ValueError("--advertise needs a port other than 0")
    if _version(bind_addr[0]) == 4 and _version(adv[0]) == 6:
        raise ValueError(
            f"--bind {bind_addr[0]} is IPv4 and --advertise {adv[0]} IPv6: members could "
            "not reach this node; bind an IPv6 address (such as [::])"
        )
    for seed in join:
        parse_address(seed, flag="--join")
    if profile not in PROFILES:
        raise ValueError(f"--profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    keys = load_keys(key_file) if key_file is not None else ()
    if key_file is not None and key_file.stat().st_mode & 0o077:
        log.warning(
            "gossip key file %s is readable by other users (mode %o): whoever reads it "
            "can join the cluster and read its records; chmod 600 it",
            key_file,
            key_file.stat().st_mode & 0o777,
        )
    if not keys and not ipaddress.ip_address(bind_addr[0]).is_loopback:
        log.warning(
            "gossip on %s:%d is not encrypted: anyone who can reach it can join the "
            "cluster, read its records and publish services; give every node "
            "--gossip-key-file (see axnet keygen)",
            *bind_addr,
        )
    options = GossipOptions(
        bind=bind_addr,
        advertise=adv,
        seeds=tuple(join),
        keys=keys,
        profile=profile,
        labels=labels,
    )
    meta = encode_meta(address or adv[0], labels)
    if len(meta) > swim.MAX_META_BYTES:
        raise ValueError(
            f"node labels take {len(meta)} bytes; at most {swim.MAX_META_BYTES} fit in gossip"
        )
    return options


__all__ = ["PROFILES", "GossipOptions", "gossip_options", "load_keys"]

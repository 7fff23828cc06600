"""The replicated service table (pure).

Theory of operation
-------------------
Two kinds of records describe where virtual addresses really live:

* an :class:`AppRecord` says "virtual IP *vip* belongs to an app on node *node*,
  whose outgoing connections leave from real address *real_host* with a source
  port inside [*port_lo*, *port_hi*]".  A server that accepts a connection from
  ``real_host:p`` finds the client's virtual address by looking for the block
  that holds *p* (the supervisor pins each client socket to its block with
  ``IP_LOCAL_PORT_RANGE``).
* a :class:`ServiceRecord` says "virtual ``vip:port`` is served at real
  ``real_host:real_port``"; it is published when an app calls ``listen``.

Each record is owned by the node that wrote it and carries a version that only
that node increases, so merging is last-writer-wins per key: a record replaces
another with the same key when ``(version, node)`` is greater.  Deletion writes
a tombstone (``deleted=True``) with a higher version; tombstones are dropped
after ``TOMBSTONE_TTL`` seconds by :meth:`ServiceTable.expire`, long enough for
every member to have heard of them through gossip or push-pull.

The table never reads a clock: callers pass ``now``.

Next to its lookup indexes the table keeps the same indexes keyed by packed
*endpoints* (:func:`endpoint`: 16 address bytes, IPv4 as v4-mapped, and a
2-byte big-endian port), which the engine's native hot path reads without
building address objects.  Both kinds are updated together, in ``merge``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from typing import TypeAlias, TypeVar

import attrs

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Seconds a tombstone is kept before it is forgotten, and how often the
#: daemon and each supervisor look for those to forget.
TOMBSTONE_TTL = 60.0
TOMBSTONE_SWEEP_S = 10.0


_V4_MAPPED = bytes(10) + b"\xff\xff"


def packed_ip(ip: IPAddress) -> bytes:
    """16 bytes: an IPv6 address as is, an IPv4 address v4-mapped."""
    return _V4_MAPPED + ip.packed if ip.version == 4 else ip.packed


#: Withdrawn services whose real address keeps their name (ServiceTable.retired_keys).
MAX_RETIRED = 4096


def endpoint(ip: IPAddress, port: int) -> bytes:
    """``ip:port`` packed as the engine's fast path keys it (18 bytes)."""
    return packed_ip(ip) + port.to_bytes(2, "big")


_K = TypeVar("_K")


def retire(retired: dict[_K, bytes], key: _K, name: bytes) -> None:
    """Keep *name* under *key* in *retired*, a map of names of what is gone
    that holds the newest MAX_RETIRED."""
    retired.pop(key, None)  # to the newest end
    if len(retired) >= MAX_RETIRED:
        del retired[next(iter(retired))]
    retired[key] = name


def unpack_endpoint(packed: bytes) -> VirtualAddress:
    """The address :func:`endpoint` packed."""
    ip = ip_address(ipaddress.IPv6Address(packed[:16]))
    return VirtualAddress(ip=ip, port=int.from_bytes(packed[16:18], "big"))


#: Addresses an app cannot own as its virtual IP: a connect to one of them
#: must keep reaching what the kernel has there (loopback above all).  Each
#: with its first and last address as integers, for a quick overlap test.
_RESERVED = tuple(
    (network, int(network.network_address), int(network.broadcast_address))
    for network in map(
        ipaddress.ip_network,
        (
            "0.0.0.0/8",
            "127.0.0.0/8",
            "169.254.0.0/16",
            "224.0.0.0/4",
            "255.255.255.255/32",
            "::/128",
            "::1/128",
            "::ffff:0:0/96",
            "fe80::/10",
            "ff00::/8",
        ),
    )
)


def reserved_reason(where: IPAddress | ipaddress.IPv4Network | ipaddress.IPv6Network) -> str | None:
    """Why *where* (an address, or a network) cannot hold virtual IPs, or None."""
    if isinstance(where, ipaddress.IPv4Address | ipaddress.IPv6Address):
        lo = hi = int(where)
    else:
        lo, hi = int(where.network_address), int(where.broadcast_address)
    for special, first, last in _RESERVED:
        if special.version == where.version and lo <= last and first <= hi:
            return (
                f"it overlaps {special} (loopback, unspecified, link-local, multicast or reserved)"
            )
    return None


def ip_address(text: str | IPAddress) -> IPAddress:
    """Parse an address and unmap IPv4-mapped IPv6 addresses (``::ffff:a.b.c.d``).

    A scoped IPv6 address (``fe80::1%eth0``) is refused with ValueError: the
    scope names an interface of one host, which a cluster-wide address has
    no use for, and Python takes any text after ``%`` (control characters
    included), while two spellings of one address would be two keys.
    """
    ip = ipaddress.ip_address(text) if isinstance(text, str) else text
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None:
            raise ValueError(f"{str(text)!r} is a scoped address: give it without '%'")
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
    return ip


@attrs.frozen(kw_only=True)
class VirtualAddress:
    """A virtual ``ip:port`` as an application sees it."""

    ip: IPAddress
    port: int

    def __str__(self) -> str:
        if self.ip.version == 6:
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"


@attrs.frozen(kw_only=True)
class RealAddress:
    """A real ``host:port`` that the kernel routes to."""

    host: IPAddress
    port: int

    def __str__(self) -> str:
        if self.host.version == 6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


Labels: TypeAlias = tuple[tuple[str, str], ...]


def labels_from(mapping: dict[str, str] | Iterable[tuple[str, str]]) -> Labels:
    """Labels in canonical (sorted) form, so equal label sets compare equal."""
    items = mapping.items() if isinstance(mapping, dict) else mapping
    return tuple(sorted((str(k), str(v)) for k, v in items))


@attrs.frozen(kw_only=True)
class AppRecord:
    """An application under axnet: its virtual IP and where its connections come from."""

    app_id: str
    node: str
    vip: IPAddress
    real_host: IPAddress
    port_lo: int
    port_hi: int
    name: str = ""
    labels: Labels = ()
    version: int = 0
    deleted: bool = False
    deleted_at: float = 0.0

    @property
    def key(self) -> str:
        return self.app_id


@attrs.frozen(kw_only=True)
class ServiceRecord:
    """A listening virtual address and the real address that serves it."""

    virtual: VirtualAddress
    real: RealAddress
    node: str
    app_id: str
    name: str = ""
    labels: Labels = ()
    version: int = 0
    deleted: bool = False
    deleted_at: float = 0.0

    @property
    def key(self) -> VirtualAddress:
        return self.virtual


def _newer(candidate: AppRecord | ServiceRecord, current: AppRecord | ServiceRecord | None) -> bool:
    if current is None:
        return True
    return (candidate.version, candidate.node) > (current.version, current.node)


@attrs.define
class ServiceTable:
    """All records known to one node or supervisor, merged last-writer-wins.

    Lookups used on the connect path are single dictionary reads, so a reader
    in another thread sees either the old or the new entry, never a torn one.
    """

    services: dict[VirtualAddress, ServiceRecord] = attrs.field(factory=dict)
    apps: dict[str, AppRecord] = attrs.field(factory=dict)
    # Indexes, rebuilt from the records above on every change.
    _by_real: dict[RealAddress, VirtualAddress] = attrs.field(factory=dict)
    _live: dict[tuple[IPAddress, int], ServiceRecord] = attrs.field(factory=dict)
    _vips: dict[IPAddress, int] = attrs.field(factory=dict)
    #: Host address → (version, lo, hi, vip) of its apps' blocks, newest
    #: first: a node gives a block to one app at a time, so where two
    #: overlap (the app before has gone, its tombstone is on its way) the
    #: newer grant is the truth.
    _blocks: dict[IPAddress, tuple[tuple[int, int, int, IPAddress], ...]] = attrs.field(
        factory=dict
    )
    # The same, packed (see `endpoint`): virtual → real, real → virtual, and
    # host address → blocks as lo (2 bytes) + hi (2 bytes) + vip (16 bytes).
    live_keys: dict[bytes, bytes] = attrs.field(factory=dict, init=False)
    real_keys: dict[bytes, bytes] = attrs.field(factory=dict, init=False)
    block_keys: dict[bytes, tuple[bytes, ...]] = attrs.field(factory=dict, init=False)
    #: Real → virtual of services withdrawn or moved, packed: connections a
    #: client made to one keep its name (the server closed its listener and
    #: serves on).  Their real port goes to no other service while such a
    #: connection holds it (see axnet._portprobe); the newest MAX_RETIRED.
    retired_keys: dict[bytes, bytes] = attrs.field(factory=dict, init=False)
    #: Host address → client port blocks of apps withdrawn since, packed as
    #: in block_keys: connections an app made keep its name after it has
    #: gone (a server holds one open, or has yet to accept it), as a peer's
    #: address outlives the peer on a kernel.  A live grant of the ports
    #: goes before them; a newer grant or withdrawal replaces them; the
    #: newest MAX_RETIRED.
    retired_block_keys: dict[bytes, tuple[bytes, ...]] = attrs.field(factory=dict, init=False)
    #: (host, packed block) → version of the grant, oldest first, for the above.
    _retired_blocks: dict[tuple[bytes, bytes], int] = attrs.field(factory=dict, init=False)

    def __len__(self) -> int:
        """Records held, tombstones included."""
        return len(self.services) + len(self.apps)

    # -- merging -----------------------------------------------------------

    def merge(self, record: AppRecord | ServiceRecord) -> bool:
        """Apply *record* if it is newer than what we hold; return whether it was."""
        return self._merge(record, keep_name=True)

    def _merge(self, record: AppRecord | ServiceRecord, *, keep_name: bool) -> bool:
        if isinstance(record, ServiceRecord):
            old_service = self.services.get(record.virtual)
            if not _newer(record, old_service):
                return False
            self.services[record.virtual] = record
            key = (record.virtual.ip, record.virtual.port)
            packed_virtual = endpoint(*key)
            packed_real = endpoint(record.real.host, record.real.port)
            if record.deleted:
                self._live.pop(key, None)
                self.live_keys.pop(packed_virtual, None)
            else:
                self._live[key] = record
                self.live_keys[packed_virtual] = packed_real
            if (
                old_service is not None
                and not old_service.deleted
                and self._by_real.get(old_service.real) == old_service.virtual
            ):
                self._by_real.pop(old_service.real, None)
                old_real = endpoint(old_service.real.host, old_service.real.port)
                if (old_virtual := self.real_keys.pop(old_real, None)) is not None:
                    retire(self.retired_keys, old_real, old_virtual)
            if not record.deleted:
                self._by_real[record.real] = record.virtual
                self.real_keys[packed_real] = packed_virtual
                self.retired_keys.pop(packed_real, None)
            return True
        old_app = self.apps.get(record.app_id)
        if not _newer(record, old_app):
            return False
        self.apps[record.app_id] = record
        if old_app is not None and not old_app.deleted:
            self._drop_app_index(old_app)
            if record.deleted and keep_name:
                self._retire_block(old_app)
        if not record.deleted:
            self._unretire_blocks(record.real_host, record.port_lo, record.port_hi, record.version)
            self._vips[record.vip] = self._vips.get(record.vip, 0) + 1
            entries = self._blocks.get(record.real_host, ())
            at = sum(1 for entry in entries if entry[0] > record.version)
            entry = (record.version, record.port_lo, record.port_hi, record.vip)
            packed = record.port_lo.to_bytes(2, "big") + record.port_hi.to_bytes(2, "big")
            host = packed_ip(record.real_host)
            keys = self.block_keys.get(host, ())
            self._blocks[record.real_host] = (*entries[:at], entry, *entries[at:])
            self.block_keys[host] = (*keys[:at], packed + packed_ip(record.vip), *keys[at:])
        return True

    def current(self, record: AppRecord | ServiceRecord) -> AppRecord | ServiceRecord | None:
        """What the table holds under *record*'s key (live or a tombstone), if anything."""
        if isinstance(record, ServiceRecord):
            return self.services.get(record.virtual)
        return self.apps.get(record.app_id)

    def forget(self, record: AppRecord | ServiceRecord) -> bool:
        """Drop *record*, as if never heard of, if the table still holds that very
        object; return whether it did.  No tombstone stays: the same record may
        come again later and must be taken then."""
        if self.current(record) is not record:
            return False
        self._merge(attrs.evolve(record, version=record.version + 1, deleted=True), keep_name=False)
        if isinstance(record, ServiceRecord):
            del self.services[record.virtual]
        else:
            del self.apps[record.app_id]
        return True

    def merge_all(
        self, records: Iterable[AppRecord | ServiceRecord]
    ) -> list[AppRecord | ServiceRecord]:
        """Merge many records; return those that changed the table."""
        return [r for r in records if self.merge(r)]

    def _drop_app_index(self, app: AppRecord) -> None:
        count = self._vips.get(app.vip, 0) - 1
        if count > 0:
            self._vips[app.vip] = count
        else:
            self._vips.pop(app.vip, None)
        # One entry each: another live app may have the same block and vip
        # (a node reused them after a restart), and keeps its own.
        entries = self._blocks.get(app.real_host, ())
        try:
            at = entries.index((app.version, app.port_lo, app.port_hi, app.vip))
        except ValueError:
            return
        host = packed_ip(app.real_host)
        keys = self.block_keys[host]
        if len(entries) > 1:
            self._blocks[app.real_host] = entries[:at] + entries[at + 1 :]
            self.block_keys[host] = keys[:at] + keys[at + 1 :]
        else:
            del self._blocks[app.real_host], self.block_keys[host]

    def _retire_block(self, app: AppRecord) -> None:
        """Keep the name of *app*'s client port block, withdrawn, for the
        connections from it (see retired_block_keys)."""
        if not app.port_hi:
            return  # it had none
        host = packed_ip(app.real_host)
        if any(
            version > app.version
            for _, version in self._overlapping_retired(host, app.port_lo, app.port_hi)
        ):
            return  # a newer holder's withdrawal came first: its name stands
        self._unretire_blocks(app.real_host, app.port_lo, app.port_hi, app.version)
        if len(self._retired_blocks) >= MAX_RETIRED:
            oldest_host, oldest = next(iter(self._retired_blocks))
            self._drop_retired(oldest_host, [oldest])
        block = app.port_lo.to_bytes(2, "big") + app.port_hi.to_bytes(2, "big") + packed_ip(app.vip)
        self._retired_blocks[host, block] = app.version
        self.retired_block_keys[host] = (block, *self.retired_block_keys.get(host, ()))

    def _overlapping_retired(self, host: bytes, lo: int, hi: int) -> list[tuple[bytes, int]]:
        return [
            (block, self._retired_blocks[host, block])
            for block in self.retired_block_keys.get(host, ())
            if int.from_bytes(block[:2], "big") <= hi and lo <= int.from_bytes(block[2:4], "big")
        ]

    def _unretire_blocks(self, real_host: IPAddress, lo: int, hi: int, version: int) -> None:
        """Forget retired blocks of *real_host* that overlap ``lo..hi`` and
        were granted before *version*: their ports have been given again."""
        if not hi:
            return
        host = packed_ip(real_host)
        older = [b for b, v in self._overlapping_retired(host, lo, hi) if v < version]
        if older:
            self._drop_retired(host, older)

    def _drop_retired(self, host: bytes, blocks: list[bytes]) -> None:
        for block in blocks:
            del self._retired_blocks[host, block]
        rest = tuple(b for b in self.retired_block_keys[host] if b not in blocks)
        if rest:
            self.retired_block_keys[host] = rest
        else:
            del self.retired_block_keys[host]

    def keep_retired(self, other: ServiceTable) -> None:
        """Take the names *other* keeps of what is gone (retired services
        and client blocks), into this table built anew to replace it, before
        any record: it would not know them, and connections made before
        still go by them."""
        self.retired_keys.update(other.retired_keys)
        for (host, block), version in other._retired_blocks.items():
            if (host, block) not in self._retired_blocks:
                self._retired_blocks[host, block] = version
                self.retired_block_keys[host] = (*self.retired_block_keys.get(host, ()), block)

    def expire(self, now: float, ttl: float = TOMBSTONE_TTL) -> int:
        """Forget tombstones older than *ttl*; return how many were dropped."""
        dead_services = [
            k for k, r in self.services.items() if r.deleted and now - r.deleted_at > ttl
        ]
        dead_apps = [k for k, a in self.apps.items() if a.deleted and now - a.deleted_at > ttl]
        for vkey in dead_services:
            del self.services[vkey]
        for akey in dead_apps:
            del self.apps[akey]
        return len(dead_services) + len(dead_apps)

    def records(self) -> Iterator[AppRecord | ServiceRecord]:
        """Every record, tombstones included (what push-pull sends)."""
        yield from self.apps.values()
        yield from self.services.values()

    def live_services(self) -> list[ServiceRecord]:
        # IPv4 and IPv6 addresses do not compare: the version goes first.
        return sorted(
            (r for r in self.services.values() if not r.deleted),
            key=lambda r: (r.virtual.ip.version, r.virtual.ip, r.virtual.port),
        )

    def live_apps(self) -> list[AppRecord]:
        return sorted(
            (a for a in self.apps.values() if not a.deleted), key=lambda a: (a.vip.version, a.vip)
        )

    # -- lookups on the connect path ----------------------------------------

    def resolve(self, ip: IPAddress, port: int) -> ServiceRecord | None:
        """The live service at virtual ``ip:port``, if any (the connect hot path)."""
        return self._live.get((ip, port))

    def is_virtual_ip(self, ip: IPAddress) -> bool:
        """Whether some live app owns *ip* as its virtual address."""
        return ip in self._vips

    def virtual_of_server(self, real: RealAddress) -> VirtualAddress | None:
        """The virtual address a real listening address serves (client's getpeername)."""
        return self._by_real.get(real)

    def retired_server(self, real: RealAddress) -> VirtualAddress | None:
        """The virtual address a real listening address served last, if its
        service is gone (a client's getpeername on a connection made then)."""
        retired = self.retired_keys.get(endpoint(real.host, real.port))
        return None if retired is None else unpack_endpoint(retired)

    def virtual_of_client(self, host: IPAddress, port: int) -> IPAddress | None:
        """The virtual IP of the app whose connections leave from ``host:port``."""
        for _, lo, hi, vip in self._blocks.get(host, ()):
            if lo <= port <= hi:
                return vip
        return None

    def retired_client(self, host: IPAddress, port: int) -> IPAddress | None:
        """The virtual IP of the app, withdrawn since, whose connections left
        from ``host:port`` (see retired_block_keys)."""
        for block in self.retired_block_keys.get(packed_ip(host), ()):
            if int.from_bytes(block[:2], "big") <= port <= int.from_bytes(block[2:4], "big"):
                return ip_address(ipaddress.IPv6Address(block[4:20]))
        return None

    def records_of_node(self, node: str) -> list[AppRecord | ServiceRecord]:
        return [r for r in self.records() if r.node == node and not r.deleted]

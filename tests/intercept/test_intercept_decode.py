from __future__ import annotations

import errno
import ipaddress
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from axnet.intercept._decode import (
    AF_INET,
    AF_INET6,
    AF_UNIX,
    MAX_SOCKADDR_LEN,
    Inet4,
    Inet6,
    OtherFamily,
    SockAddr,
    SockaddrError,
    Unix,
    decode_sockaddr,
    encode_sockaddr,
    unmap,
    unspec_wildcard_as_inet,
    v4_mapped,
)

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address

# Vectors laid out by hand from <netinet/in.h> (family in host order, the rest in network order).
LOOPBACK_80 = b"\x02\x00" + b"\x00\x50" + b"\x7f\x00\x00\x01" + bytes(8)
V6_443 = (
    b"\x0a\x00" + b"\x01\xbb" + b"\x00\x01\x02\x03" + V6("2001:db8::1").packed + b"\x07\x00\x00\x00"
)


def test_inet4_vector() -> None:
    assert decode_sockaddr(LOOPBACK_80) == Inet4(V4("127.0.0.1"), 80)
    assert encode_sockaddr(Inet4(V4("127.0.0.1"), 80)) == LOOPBACK_80


def test_inet6_vector() -> None:
    addr = Inet6(V6("2001:db8::1"), 443, flowinfo=0x00010203, scope_id=7)
    assert decode_sockaddr(V6_443) == addr
    assert encode_sockaddr(addr) == V6_443


def test_constants_agree_with_the_socket_module() -> None:
    assert (AF_UNIX, AF_INET, AF_INET6) == (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6)


def test_rfc2133_sized_inet6_has_no_scope() -> None:
    assert decode_sockaddr(V6_443[:24]) == Inet6(V6("2001:db8::1"), 443, 0x00010203, 0)


def test_trailing_bytes_are_ignored_as_the_kernel_does() -> None:
    assert decode_sockaddr(LOOPBACK_80 + b"\xff" * 12) == Inet4(V4("127.0.0.1"), 80)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x02",
        LOOPBACK_80[:15],
        LOOPBACK_80[:2],
        V6_443[:23],
        V6_443[:16],
        LOOPBACK_80 + bytes(MAX_SOCKADDR_LEN - 15),
        b"\x01\x00" + b"a" * 109,
    ],
)
def test_malformed_is_einval(data: bytes) -> None:
    with pytest.raises(SockaddrError) as info:
        decode_sockaddr(data)
    assert info.value.errno == errno.EINVAL


def test_unix_addresses() -> None:
    assert decode_sockaddr(b"\x01\x00/run/x.sock\x00garbage") == Unix(b"/run/x.sock")
    abstract = decode_sockaddr(b"\x01\x00\x00name\x00x")
    assert abstract == Unix(b"\x00name\x00x")
    assert isinstance(abstract, Unix)
    assert abstract.abstract
    assert decode_sockaddr(b"\x01\x00") == Unix(b"")
    assert encode_sockaddr(Unix(b"/run/x.sock")) == b"\x01\x00/run/x.sock\x00"
    assert encode_sockaddr(Unix(b"/" * 108)) == b"\x01\x00" + b"/" * 108
    with pytest.raises(ValueError, match="contains NUL"):
        encode_sockaddr(Unix(b"/a\x00b"))


def test_other_families_are_passed_through() -> None:
    assert decode_sockaddr(b"\x00\x00abc") == OtherFamily(0, b"abc")
    assert decode_sockaddr(b"\x10\x00" + bytes(10)) == OtherFamily(16, bytes(10))
    with pytest.raises(ValueError, match="own class"):
        OtherFamily(AF_INET, b"")


def test_an_unspec_wildcard_is_an_inet_bind_address() -> None:
    # struct sockaddr_in with the family left zero, as __inet_bind accepts it.
    unspec = b"\x00\x00\x00\x50" + bytes(12)
    assert unspec_wildcard_as_inet(unspec) == b"\x02\x00\x00\x50" + bytes(12)
    assert unspec_wildcard_as_inet(unspec + b"tail") == b"\x02\x00\x00\x50" + bytes(12) + b"tail"
    assert unspec_wildcard_as_inet(b"\x00\x00\x00\x50\x7f\x00\x00\x01" + bytes(8)) is None
    assert unspec_wildcard_as_inet(b"\x02\x00\x00\x50" + bytes(12)) is None  # already AF_INET
    assert unspec_wildcard_as_inet(bytes(15)) is None  # too short for a sockaddr_in


def test_field_validation() -> None:
    with pytest.raises(ValueError, match=r"port must be 0\.\.65535, got 65536"):
        Inet4(V4("1.2.3.4"), 65536)
    with pytest.raises(ValueError, match="scope_id"):
        Inet6(V6("::1"), 1, scope_id=-1)


def test_v4_mapping() -> None:
    addr = Inet4(V4("10.1.0.5"), 80)
    mapped = v4_mapped(addr)
    assert mapped == Inet6(V6("::ffff:10.1.0.5"), 80)
    assert unmap(mapped) == addr
    plain = Inet6(V6("2001:db8::5"), 80)
    assert unmap(plain) is plain


ports = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
inet4 = st.builds(Inet4, st.ip_addresses(v=4), ports)
inet6 = st.builds(Inet6, st.ip_addresses(v=6), ports, u32, u32)
pathname = st.binary(min_size=1, max_size=108).filter(lambda p: b"\x00" not in p)
abstract = st.binary(max_size=107).map(lambda p: b"\x00" + p)
unix = st.builds(Unix, st.one_of(st.just(b""), pathname, abstract))
other = st.builds(
    OtherFamily,
    st.integers(0, 0xFFFF).filter(lambda f: f not in (AF_UNIX, AF_INET, AF_INET6)),
    st.binary(max_size=MAX_SOCKADDR_LEN - 2),
)
addresses = st.one_of(inet4, inet6, unix, other)


@given(addresses)
def test_round_trip(addr: SockAddr) -> None:
    data = encode_sockaddr(addr)
    assert len(data) <= MAX_SOCKADDR_LEN
    assert decode_sockaddr(data) == addr


@given(inet4)
def test_v4_mapped_round_trip(addr: Inet4) -> None:
    assert unmap(v4_mapped(addr)) == addr


@given(
    st.one_of(
        st.binary(max_size=2 * MAX_SOCKADDR_LEN),
        st.tuples(st.sampled_from([b"\x01\x00", b"\x02\x00", b"\x0a\x00"]), st.binary()).map(
            lambda t: t[0] + t[1]
        ),
    )
)
def test_decoding_arbitrary_bytes_raises_only_sockaddr_error(data: bytes) -> None:
    try:
        addr = decode_sockaddr(data)
    except SockaddrError as e:
        assert e.errno == errno.EINVAL
        return
    # What decodes is canonical: it encodes to bytes that decode to itself.
    assert decode_sockaddr(encode_sockaddr(addr)) == addr

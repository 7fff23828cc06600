from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from axnet.intercept import _bpf
from axnet.intercept._bpf import (
    AUDIT_ARCH_I386,
    AUDIT_ARCH_X86_64,
    ENOSYS,
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_ERRNO,
    SECCOMP_RET_USER_NOTIF,
    build_filter,
)

from ._bpf_vm import SeccompData, VerifierError, run, verify

PROGRAM = build_filter()
NOTIFY = SECCOMP_RET_USER_NOTIF
ALLOW = SECCOMP_RET_ALLOW
REFUSE = SECCOMP_RET_ERRNO | ENOSYS
U64 = (1 << 64) - 1


def action(nr: int, *, arch: int = AUDIT_ARCH_X86_64, addrlen: int = 16) -> int:
    return run(PROGRAM, SeccompData(nr, arch, 0, (3, 0x7FFF0000, addrlen, 0, 0, 0))).action


def expected(data: SeccompData) -> int:
    """The policy, written independently of the assembler."""
    if data.arch != AUDIT_ARCH_X86_64 or data.nr & 0xFFFFFFFF >= 0x40000000:
        return REFUSE
    if data.nr in (425, 426, 427):
        return REFUSE
    if data.nr in (42, 49):
        return NOTIFY if data.args[2] & 0xFFFFFFFF >= 16 else ALLOW
    if data.nr in (50, 43, 288, 51, 52):
        return NOTIFY
    flags = {44: 3, 307: 3, 46: 2}.get(data.nr)
    if flags is not None and data.args[flags] & 0x20000000:  # MSG_FASTOPEN
        return NOTIFY
    return ALLOW


def test_program_passes_the_verifier_and_round_trips() -> None:
    insns = verify(PROGRAM)
    assert _bpf.pack(insns) == PROGRAM
    assert len(PROGRAM) % 8 == 0
    assert len(insns) < 32  # short: it runs on every syscall not in the action cache


def test_listing_is_readable() -> None:
    text = _bpf.listing(PROGRAM)
    assert text.splitlines()[0] == "  0: ld [4]"
    assert "ret USER_NOTIF" in text
    assert "ret ERRNO(38)" in text


@pytest.mark.parametrize("nr", [42, 49])
@pytest.mark.parametrize(
    ("addrlen", "want"),
    [
        (0, ALLOW),
        (2, ALLOW),
        (15, ALLOW),
        (16, NOTIFY),
        (24, NOTIFY),
        (28, NOTIFY),
        (110, NOTIFY),
        (128, NOTIFY),
        (0xFFFFFFFF, NOTIFY),
        (0x1_0000_000F, ALLOW),  # only the low 32 bits are socklen_t
        (0xFFFFFFFF_00000010, NOTIFY),
        (0xFFFFFFFF_00000000, ALLOW),
    ],
)
def test_connect_and_bind_trap_only_inet_sized_addresses(nr: int, addrlen: int, want: int) -> None:
    assert action(nr, addrlen=addrlen) == want


@pytest.mark.parametrize("nr", [50, 43, 288, 51, 52])
@pytest.mark.parametrize("addrlen", [0, 15, 16, U64])
def test_socket_calls_always_trap(nr: int, addrlen: int) -> None:
    assert action(nr, addrlen=addrlen) == NOTIFY


@pytest.mark.parametrize(("nr", "flags_arg"), [(44, 3), (46, 2), (307, 3)])
def test_sends_trap_only_with_fast_open(nr: int, flags_arg: int) -> None:
    def with_flags(flags: int) -> int:
        args = [3, 0x7FFF0000, 16, 0, 0, 0]
        args[flags_arg] = flags
        a0, a1, a2, a3, a4, a5 = args
        return run(PROGRAM, SeccompData(nr, args=(a0, a1, a2, a3, a4, a5))).action

    assert with_flags(0) == ALLOW
    assert with_flags(0x4000 | 0x40) == ALLOW  # MSG_NOSIGNAL | MSG_DONTWAIT
    assert with_flags(0x20000000) == NOTIFY
    assert with_flags(0x20000000 | 0x4000) == NOTIFY
    assert with_flags(0xFFFFFFFF_00000000) == ALLOW  # flags is an int: the low half only


@pytest.mark.parametrize("nr", [425, 426, 427])
def test_io_uring_is_refused(nr: int) -> None:
    assert action(nr) == REFUSE


@pytest.mark.parametrize(
    "nr", [0, 1, 41, 44, 45, 46, 47, 48, 53, 54, 55, 56, 57, 59, 231, 424, 428]
)
def test_other_calls_are_allowed(nr: int) -> None:
    assert action(nr) == ALLOW


@pytest.mark.parametrize("arch", [AUDIT_ARCH_I386, 0, 0x40000028, 0xC00000B7, 0x4000003E])
@pytest.mark.parametrize("nr", [0, 42, 102, 362])  # 102 socketcall, 362 connect on i386
def test_foreign_abis_are_refused(arch: int, nr: int) -> None:
    assert action(nr, arch=arch) == REFUSE


@pytest.mark.parametrize("nr", [0x40000000, 0x40000000 | 42, 0x40000000 | 39, 0x7FFFFFFF, -1])
def test_x32_and_out_of_range_numbers_are_refused(nr: int) -> None:
    assert action(nr & 0xFFFFFFFF) == REFUSE


def test_only_address_calls_and_sends_read_arguments() -> None:
    # Paths that read only nr and arch are what the kernel's action cache can prove.
    for nr in range(0, 500):
        outcome = run(PROGRAM, SeccompData(nr))
        if nr in (42, 49, 46):  # addrlen; sendmsg's flags
            assert outcome.loads == {0, 4, 32}
        elif nr in (44, 307):  # sendto's and sendmmsg's flags
            assert outcome.loads == {0, 4, 40}
        else:
            assert outcome.loads <= {0, 4}, nr


args_st = st.tuples(*[st.integers(0, U64)] * 6)
interesting_nr = st.sampled_from(
    [42, 44, 46, 49, 50, 43, 288, 51, 52, 307, 425, 426, 427, 0x40000000 | 42]
)


@given(
    nr=st.one_of(st.integers(0, 0xFFFFFFFF), interesting_nr),
    arch=st.one_of(st.just(AUDIT_ARCH_X86_64), st.integers(0, 0xFFFFFFFF)),
    ip=st.integers(0, U64),
    args=args_st,
)
def test_filter_matches_the_policy(
    nr: int, arch: int, ip: int, args: tuple[int, int, int, int, int, int]
) -> None:
    data = SeccompData(nr, arch, ip, args)
    assert run(PROGRAM, data).action == expected(data)


def test_only_x86_64_is_supported() -> None:
    with pytest.raises(ValueError, match="only AUDIT_ARCH_X86_64"):
        build_filter(arch=AUDIT_ARCH_I386)


def test_assembler_refuses_bad_programs() -> None:
    with pytest.raises(ValueError, match="undefined label 'nowhere'"):
        _bpf.assemble([_bpf.ld_abs(0), _bpf.jeq(1, jt="nowhere"), _bpf.ret(ALLOW)])
    with pytest.raises(ValueError, match="defined twice"):
        _bpf.assemble([_bpf.Label("a"), _bpf.Label("a"), _bpf.ret(ALLOW)])
    with pytest.raises(ValueError, match="does not fit"):
        _bpf.assemble([_bpf.Label("back"), _bpf.ld_abs(0), _bpf.jeq(1, jt="back"), _bpf.ret(0)])
    with pytest.raises(ValueError, match="must end with a return"):
        _bpf.assemble([_bpf.ld_abs(0)])
    with pytest.raises(ValueError, match="multiple of 8"):
        _bpf.disassemble(b"\x00" * 9)


def test_vm_catches_broken_programs() -> None:
    with pytest.raises(VerifierError, match="outside seccomp_data"):
        verify(_bpf.pack([_bpf.ld_abs(64), _bpf.ret(ALLOW)]))
    with pytest.raises(VerifierError, match="past the end"):
        verify(_bpf.pack([_bpf.Insn(_bpf.JEQ_K, 5, 0, 0), _bpf.ret(ALLOW)]))

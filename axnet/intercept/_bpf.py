"""Classic-BPF assembly of the seccomp filter that `axnet run` installs.

Theory of operation
-------------------
The kernel runs this program on every system call of the application and of
everything it forks or executes, so it must be short on the common path and it
must never let an address the supervisor did not see reach the kernel.

* The architecture is checked first.  `seccomp_data.nr` means nothing without
  `seccomp_data.arch`: the same number is a different call under the i386 ABI
  (`int 0x80` from a 64-bit process).  Foreign ABIs, and the x32 ABI (which
  shares AUDIT_ARCH_X86_64 and marks its numbers with bit 30), are answered
  ENOSYS instead of being trusted.
* io_uring is answered ENOSYS: a ring submits connect/accept/bind from kernel
  context where no filter sees them.  Runtimes that probe for io_uring fall
  back to ordinary system calls.
* connect/bind trap only when the low 32 bits of `addrlen` (args[2]) are
  >= 16 (sizeof(struct sockaddr_in)).  The kernel rejects shorter AF_INET and
  AF_INET6 addresses with EINVAL, so what slips past is at most a short
  AF_UNIX path, which the supervisor has no business with.  `socklen_t` is 32
  bits and the kernel ignores the upper half of the register, so we must too.
* sendto/sendmsg/sendmmsg trap only with MSG_FASTOPEN in their flags
  (args[3], args[2], args[3]; `int`, so the low 32 bits).  TCP Fast Open
  connects inside the send, to an address the supervisor would otherwise
  never see: a virtual IP would leave on the real network.  Every other send
  is allowed after a dozen instructions.  The action cache can no longer
  prove these calls always allowed, so each send runs the filter: about
  15 ns on the development machine (a send costs 300), where the order of
  the tests made no measurable difference.
* Every other path is a plain `RET_ALLOW` that depends on `nr` and `arch`
  only.  That keeps the kernel's seccomp action cache (Linux >= 5.11) able to
  prove those calls always allowed and skip running the filter for them.

Classic BPF jumps are forward only with 8-bit offsets; the tiny assembler
below resolves symbolic labels and refuses anything that does not fit.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

import attrs

# --- classic BPF opcodes (linux/filter.h, linux/bpf_common.h) ---------------
BPF_LD = 0x00
BPF_JMP = 0x05
BPF_RET = 0x06
BPF_W = 0x00
BPF_ABS = 0x20
BPF_K = 0x00
BPF_JA = 0x00
BPF_JEQ = 0x10
BPF_JGT = 0x20
BPF_JGE = 0x30
BPF_JSET = 0x40

LD_W_ABS = BPF_LD | BPF_W | BPF_ABS
JEQ_K = BPF_JMP | BPF_JEQ | BPF_K
JGE_K = BPF_JMP | BPF_JGE | BPF_K
JGT_K = BPF_JMP | BPF_JGT | BPF_K
JSET_K = BPF_JMP | BPF_JSET | BPF_K
JA = BPF_JMP | BPF_JA
RET_K = BPF_RET | BPF_K

# --- seccomp (linux/seccomp.h, linux/audit.h) --------------------------------
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_TRACE = 0x7FF00000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_DATA = 0x0000FFFF

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
X32_SYSCALL_BIT = 0x40000000

ENOSYS = 38  # asm-generic/errno.h; identical on every Linux architecture

# struct seccomp_data { int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]; }
SECCOMP_DATA_NR = 0
SECCOMP_DATA_ARCH = 4
SECCOMP_DATA_IP = 8
SECCOMP_DATA_SIZE = 64


def seccomp_data_arg_lo(index: int) -> int:
    """Offset of the low 32 bits of args[index] (x86_64 is little-endian)."""
    if not 0 <= index < 6:
        raise ValueError(f"seccomp_data has args 0..5, got {index}")
    return 16 + 8 * index


# --- x86_64 system call numbers (arch/x86/entry/syscalls/syscall_64.tbl) ------
NR_CONNECT = 42
NR_ACCEPT = 43
NR_SENDTO = 44
NR_SENDMSG = 46
NR_BIND = 49
NR_LISTEN = 50
NR_GETSOCKNAME = 51
NR_GETPEERNAME = 52
NR_ACCEPT4 = 288
NR_SENDMMSG = 307
NR_IO_URING_SETUP = 425
NR_IO_URING_ENTER = 426
NR_IO_URING_REGISTER = 427

#: connect/bind trap only from this addrlen up: sizeof(struct sockaddr_in).
MIN_INET_ADDRLEN = 16

#: Calls trapped when their addrlen could hold an AF_INET/AF_INET6 address.
ADDRESS_CALLS = (NR_CONNECT, NR_BIND)
#: Calls trapped unconditionally.
ALWAYS_TRAPPED = (NR_LISTEN, NR_ACCEPT, NR_ACCEPT4, NR_GETSOCKNAME, NR_GETPEERNAME)
#: linux/socket.h: a send that connects first (TCP Fast Open).
MSG_FASTOPEN = 0x20000000
#: Sends trapped when their flags (this argument) ask for Fast Open.
FASTOPEN_FLAGS_ARG = {NR_SENDTO: 3, NR_SENDMMSG: 3, NR_SENDMSG: 2}
#: Calls refused with ENOSYS.
REFUSED = (NR_IO_URING_SETUP, NR_IO_URING_ENTER, NR_IO_URING_REGISTER)

SOCK_FILTER = struct.Struct("=HBBI")  # struct sock_filter { u16 code; u8 jt; u8 jf; u32 k; }
BPF_MAXINSNS = 4096


@attrs.frozen
class Insn:
    """One `struct sock_filter` instruction with resolved jump offsets."""

    code: int
    jt: int = 0
    jf: int = 0
    k: int = 0

    def pack(self) -> bytes:
        return SOCK_FILTER.pack(self.code, self.jt, self.jf, self.k)

    def __str__(self) -> str:
        return _format(self)


@attrs.frozen
class Label:
    """A position in the program that jumps may name."""

    name: str


@attrs.frozen
class _Jump:
    code: int
    k: int
    jt: str | None  # label name, None = fall through
    jf: str | None


def ld_abs(offset: int) -> Insn:
    return Insn(LD_W_ABS, k=offset)


def ret(value: int) -> Insn:
    return Insn(RET_K, k=value)


def jeq(k: int, jt: str | None = None, jf: str | None = None) -> _Jump:
    return _Jump(JEQ_K, k, jt, jf)


def jge(k: int, jt: str | None = None, jf: str | None = None) -> _Jump:
    return _Jump(JGE_K, k, jt, jf)


def jgt(k: int, jt: str | None = None, jf: str | None = None) -> _Jump:
    return _Jump(JGT_K, k, jt, jf)


def jset(k: int, jt: str | None = None, jf: str | None = None) -> _Jump:
    return _Jump(JSET_K, k, jt, jf)


Statement = Insn | Label | _Jump


def assemble(statements: Iterable[Statement]) -> list[Insn]:
    """Resolve labels into forward jump offsets."""
    body: list[Insn | _Jump] = []
    labels: dict[str, int] = {}
    for st in statements:
        if isinstance(st, Label):
            if st.name in labels:
                raise ValueError(f"label {st.name!r} defined twice")
            labels[st.name] = len(body)
        else:
            body.append(st)
    out: list[Insn] = []
    for pc, st in enumerate(body):
        if isinstance(st, Insn):
            out.append(st)
            continue
        out.append(Insn(st.code, _offset(labels, pc, st.jt), _offset(labels, pc, st.jf), st.k))
    if not out or out[-1].code != RET_K:
        raise ValueError("a seccomp program must end with a return")
    if len(out) > BPF_MAXINSNS:
        raise ValueError(f"program has {len(out)} instructions, the limit is {BPF_MAXINSNS}")
    return out


def _offset(labels: dict[str, int], pc: int, target: str | None) -> int:
    if target is None:
        return 0
    if target not in labels:
        raise ValueError(f"jump to undefined label {target!r}")
    off = labels[target] - pc - 1
    if not 0 <= off <= 255:
        raise ValueError(f"jump from {pc} to {target!r} does not fit in 8 bits ({off})")
    return off


def instructions(*, arch: int = AUDIT_ARCH_X86_64) -> list[Insn]:
    """The filter policy as a list of instructions (see the module docstring)."""
    if arch != AUDIT_ARCH_X86_64:
        # The syscall numbers above are the x86_64 table; another arch needs its own.
        raise ValueError(
            f"only AUDIT_ARCH_X86_64 (0x{AUDIT_ARCH_X86_64:08x}) is supported, got 0x{arch:08x}"
        )
    prog: list[Statement] = [
        ld_abs(SECCOMP_DATA_ARCH),
        jeq(arch, jf="enosys"),
        ld_abs(SECCOMP_DATA_NR),
        jge(X32_SYSCALL_BIT, jt="enosys"),
    ]
    prog += [jeq(nr, jt="addrlen") for nr in ADDRESS_CALLS]
    prog += [jeq(nr, jt="notify") for nr in ALWAYS_TRAPPED]
    prog += [jeq(nr, jt=f"flags{arg}") for nr, arg in FASTOPEN_FLAGS_ARG.items()]
    prog += [jeq(nr, jt="enosys") for nr in REFUSED]
    prog.append(ret(SECCOMP_RET_ALLOW))
    for arg in sorted(set(FASTOPEN_FLAGS_ARG.values())):
        prog += [
            Label(f"flags{arg}"),
            ld_abs(seccomp_data_arg_lo(arg)),
            jset(MSG_FASTOPEN, jt="notify", jf="short"),
        ]
    prog += [
        Label("addrlen"),
        ld_abs(seccomp_data_arg_lo(2)),
        jge(MIN_INET_ADDRLEN, jf="short"),
        Label("notify"),
        ret(SECCOMP_RET_USER_NOTIF),
        Label("enosys"),
        ret(SECCOMP_RET_ERRNO | ENOSYS),
        Label("short"),  # jumps only go forward, hence a second ALLOW
        ret(SECCOMP_RET_ALLOW),
    ]
    return assemble(prog)


def pack(program: Sequence[Insn]) -> bytes:
    return b"".join(insn.pack() for insn in program)


def build_filter(*, arch: int = AUDIT_ARCH_X86_64) -> bytes:
    """The packed `struct sock_filter[]` for `install_filter`."""
    return pack(instructions(arch=arch))


def disassemble(program: bytes) -> list[Insn]:
    if len(program) % SOCK_FILTER.size:
        raise ValueError(f"program length {len(program)} is not a multiple of 8")
    return [Insn(*fields) for fields in SOCK_FILTER.iter_unpack(program)]


_JUMP_NAMES = {JEQ_K: "jeq", JGE_K: "jge", JGT_K: "jgt", JSET_K: "jset"}
_RET_NAMES = {
    SECCOMP_RET_KILL_PROCESS: "KILL_PROCESS",
    SECCOMP_RET_ALLOW: "ALLOW",
    SECCOMP_RET_USER_NOTIF: "USER_NOTIF",
    SECCOMP_RET_TRACE: "TRACE",
}


def _format(insn: Insn) -> str:
    if insn.code == LD_W_ABS:
        return f"ld [{insn.k}]"
    if insn.code in _JUMP_NAMES:
        return f"{_JUMP_NAMES[insn.code]} #0x{insn.k:x}, +{insn.jt}, +{insn.jf}"
    if insn.code == JA:
        return f"ja +{insn.k}"
    if insn.code == RET_K:
        if insn.k & ~SECCOMP_RET_DATA == SECCOMP_RET_ERRNO:
            return f"ret ERRNO({insn.k & SECCOMP_RET_DATA})"
        return f"ret {_RET_NAMES.get(insn.k, hex(insn.k))}"
    return f"op 0x{insn.code:02x} jt={insn.jt} jf={insn.jf} k=0x{insn.k:x}"


def listing(program: bytes) -> str:
    """Human-readable disassembly, one numbered instruction a line."""
    return "\n".join(f"{pc:3d}: {insn}" for pc, insn in enumerate(disassemble(program)))

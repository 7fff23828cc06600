"""A classic-BPF interpreter for the subset seccomp accepts, to run our filter in tests.

It checks what the kernel's verifier (seccomp_check_filter, bpf_check_classic)
would refuse: loads outside `struct seccomp_data` or unaligned, jumps past the
end, a program that can fall off its end.
"""

from __future__ import annotations

import struct

import attrs

from axnet.intercept import _bpf

SECCOMP_DATA = struct.Struct("=iIQ6Q")
U32 = 0xFFFFFFFF


@attrs.frozen
class SeccompData:
    nr: int
    arch: int = _bpf.AUDIT_ARCH_X86_64
    ip: int = 0
    args: tuple[int, int, int, int, int, int] = (0, 0, 0, 0, 0, 0)

    def pack(self) -> bytes:
        nr = self.nr - (1 << 32) if self.nr >= 1 << 31 else self.nr  # `int nr` in the kernel
        return SECCOMP_DATA.pack(nr, self.arch, self.ip, *self.args)


@attrs.frozen
class Outcome:
    action: int
    loads: frozenset[int]  # offsets into seccomp_data the program read on this path


class VerifierError(Exception):
    pass


def verify(program: bytes) -> list[_bpf.Insn]:
    insns = _bpf.disassemble(program)
    if not 0 < len(insns) <= _bpf.BPF_MAXINSNS:
        raise VerifierError(f"bad length {len(insns)}")
    for pc, insn in enumerate(insns):
        if insn.code == _bpf.LD_W_ABS:
            if insn.k % 4 or insn.k + 4 > _bpf.SECCOMP_DATA_SIZE:
                raise VerifierError(f"{pc}: load outside seccomp_data: {insn.k}")
        elif insn.code in (_bpf.JEQ_K, _bpf.JGE_K, _bpf.JGT_K, _bpf.JSET_K):
            if pc + 1 + max(insn.jt, insn.jf) >= len(insns):
                raise VerifierError(f"{pc}: jump past the end")
        elif insn.code == _bpf.JA:
            if pc + 1 + insn.k >= len(insns):
                raise VerifierError(f"{pc}: ja past the end")
        elif insn.code != _bpf.RET_K:
            raise VerifierError(f"{pc}: opcode 0x{insn.code:02x} not supported here")
    if insns[-1].code != _bpf.RET_K:
        raise VerifierError("program does not end with ret")
    return insns


def run(program: bytes, data: SeccompData) -> Outcome:
    insns = verify(program)
    mem = data.pack()
    acc = 0
    pc = 0
    loads: set[int] = set()
    for _ in range(len(insns)):  # forward-only jumps: each insn runs at most once
        insn = insns[pc]
        pc += 1
        code = insn.code
        if code == _bpf.LD_W_ABS:
            acc = struct.unpack_from("=I", mem, insn.k)[0]
            loads.add(insn.k)
        elif code == _bpf.RET_K:
            return Outcome(insn.k, frozenset(loads))
        elif code == _bpf.JA:
            pc += insn.k
        else:
            if code == _bpf.JEQ_K:
                taken = acc == insn.k
            elif code == _bpf.JGE_K:
                taken = acc >= insn.k
            elif code == _bpf.JGT_K:
                taken = acc > insn.k
            else:
                taken = bool(acc & insn.k)
            pc += insn.jt if taken else insn.jf
    raise VerifierError("fell off the end")

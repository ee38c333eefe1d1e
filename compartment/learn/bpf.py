"""A classic-BPF interpreter for seccomp programs: what would this filter answer to this call?

`compartment learn` only, supervisor side.  The learning filter sends the supervisor more calls
than the base policy refuses (every file and process call, to see paths), so for each
notification learn asks the compiled programs themselves: would the base policy's filter have
refused it, and would the most permissive filter any policy can compile still refuse it (the
built-in baseline)?  Running the very BPF the kernel runs leaves nothing to keep in step with
compartment.syscall_filter: no second copy of its rules.

The input is the kernel's struct seccomp_data, as the notification carries it (64 bytes).  Only
the instructions a seccomp filter may hold are known (the kernel's seccomp_check_filter list);
anything else is an error, never a guess.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable

from compartment import syscalls

_INSTRUCTION = struct.Struct("=HBBI")
_MASK32 = 0xFFFFFFFF
_MEMORY_WORDS = 16
_STEP_LIMIT = 1 << 16  # jumps only go forward, so a program ends well before this

# Operations on (A, operand) for BPF_ALU, by the BPF_OP bits.
_ALU: dict[int, Callable[[int, int], int]] = {
    0x00: lambda a, b: a + b, 0x10: lambda a, b: a - b, 0x20: lambda a, b: a * b,
    0x30: lambda a, b: a // b if b else 0, 0x40: lambda a, b: a | b, 0x50: lambda a, b: a & b,
    0x60: lambda a, b: a << b if b < 32 else 0, 0x70: lambda a, b: a >> b if b < 32 else 0,
    0x90: lambda a, b: a % b if b else 0, 0xA0: lambda a, b: a ^ b,
}
# Conditions of BPF_JMP, by the BPF_OP bits (BPF_JA, 0x00, is handled apart).
_JUMP: dict[int, Callable[[int, int], bool]] = {
    0x10: lambda a, b: a == b, 0x20: lambda a, b: a > b, 0x30: lambda a, b: a >= b,
    0x40: lambda a, b: bool(a & b),
}


class BpfError(Exception):
    """The program holds an instruction seccomp does not allow, or runs off its end."""


class Program:
    """A compiled filter, decoded once and run on each call's seccomp_data."""

    def __init__(self, bpf: bytes) -> None:
        if not bpf or len(bpf) % _INSTRUCTION.size:
            raise BpfError(f"a BPF program of {len(bpf)} bytes is not whole instructions")
        self.code = [_INSTRUCTION.unpack_from(bpf, at)
                     for at in range(0, len(bpf), _INSTRUCTION.size)]

    def run(self, data: bytes) -> int:
        """The action word the filter returns for `data` (struct seccomp_data, 64 bytes)."""
        a = x = 0
        memory = [0] * _MEMORY_WORDS
        pc = 0
        for _ in range(_STEP_LIMIT):
            if pc >= len(self.code):
                break
            code, jt, jf, k = self.code[pc]
            pc += 1
            kind, source = code & 0x07, code & 0x08
            if code == 0x20:  # BPF_LD | BPF_W | BPF_ABS
                a = _word(data, k)
            elif code == 0x00:  # BPF_LD | BPF_IMM
                a = k
            elif code == 0x60:  # BPF_LD | BPF_MEM
                a = memory[_slot(k)]
            elif code == 0x01:  # BPF_LDX | BPF_IMM
                x = k
            elif code == 0x61:  # BPF_LDX | BPF_MEM
                x = memory[_slot(k)]
            elif code == 0x02:  # BPF_ST
                memory[_slot(k)] = a
            elif code == 0x03:  # BPF_STX
                memory[_slot(k)] = x
            elif code == 0x07:  # BPF_MISC | BPF_TAX
                x = a
            elif code == 0x87:  # BPF_MISC | BPF_TXA
                a = x
            elif code == 0x06:  # BPF_RET | BPF_K
                return k
            elif code == 0x16:  # BPF_RET | BPF_A
                return a
            elif kind == 0x04 and code & 0xF0 == 0x80:  # BPF_ALU | BPF_NEG
                a = -a & _MASK32
            elif kind == 0x04 and code & 0xF0 in _ALU:
                a = _ALU[code & 0xF0](a, x if source else k) & _MASK32
            elif code == 0x05:  # BPF_JMP | BPF_JA
                pc += k
            elif kind == 0x05 and code & 0xF0 in _JUMP:
                pc += jt if _JUMP[code & 0xF0](a, x if source else k) else jf
            else:
                raise BpfError(f"instruction {pc - 1}: opcode {code:#04x} is not one seccomp "
                               "allows")
        raise BpfError("the program ran off its end without returning an action")


def action(word: int) -> int:
    """The action part of a filter's return value (SECCOMP_RET_ACTION_FULL)."""
    return word & syscalls.SECCOMP_RET_ACTION_FULL


def _word(data: bytes, offset: int) -> int:
    if offset % 4 or offset + 4 > len(data):
        raise BpfError(f"load of seccomp_data at offset {offset}: outside the 64 bytes")
    return int.from_bytes(data[offset:offset + 4], sys.byteorder)  # the kernel loads natively


def _slot(k: int) -> int:
    if k >= _MEMORY_WORDS:
        raise BpfError(f"scratch memory word {k}: there are {_MEMORY_WORDS}")
    return k

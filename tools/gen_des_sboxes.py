"""Generate protocols/_des_sboxes.h: gate networks (AND, OR, XOR, AND-NOT, NOT) for the eight DES
S-boxes, for bitsliced DES.

    python3 tools/gen_des_sboxes.py 5 > protocols/_des_sboxes.h     # width 5: ~5 min, 61.25 gates avg

The method is Matthew Kwan's ("Reducing the Gate Count of Bitslice DES", IACR ePrint 2000/051):
each output bit is a 64-entry truth table over the six S-box inputs; it is built from gates
already in the circuit where possible (one gate over any pair of existing nodes), otherwise by
choosing a select input v and writing f = f0 ^ (v & h) (or f = f1 ^ (~v & h)), where f0 only has
to be right where v = 0 and h only where v = 1 (don't-cares make the halves cheap), recursively.
Gates built for one output are reused by the next; output orders and the first select inputs are
searched, the smallest circuit wins. The networks are generated here from the FIPS 46-3 S-box
tables, not copied: every one is checked against the table over all 64 inputs before it is
written, and the DES tests check the whole cipher against `cryptography`.
"""
import itertools
import sys

SBOX = [
    [14, 4, 13, 1, 2, 15, 11, 8, 3, 10, 6, 12, 5, 9, 0, 7, 0, 15, 7, 4, 14, 2, 13, 1, 10, 6, 12, 11, 9, 5, 3, 8,
     4, 1, 14, 8, 13, 6, 2, 11, 15, 12, 9, 7, 3, 10, 5, 0, 15, 12, 8, 2, 4, 9, 1, 7, 5, 11, 3, 14, 10, 0, 6, 13],
    [15, 1, 8, 14, 6, 11, 3, 4, 9, 7, 2, 13, 12, 0, 5, 10, 3, 13, 4, 7, 15, 2, 8, 14, 12, 0, 1, 10, 6, 9, 11, 5,
     0, 14, 7, 11, 10, 4, 13, 1, 5, 8, 12, 6, 9, 3, 2, 15, 13, 8, 10, 1, 3, 15, 4, 2, 11, 6, 7, 12, 0, 5, 14, 9],
    [10, 0, 9, 14, 6, 3, 15, 5, 1, 13, 12, 7, 11, 4, 2, 8, 13, 7, 0, 9, 3, 4, 6, 10, 2, 8, 5, 14, 12, 11, 15, 1,
     13, 6, 4, 9, 8, 15, 3, 0, 11, 1, 2, 12, 5, 10, 14, 7, 1, 10, 13, 0, 6, 9, 8, 7, 4, 15, 14, 3, 11, 5, 2, 12],
    [7, 13, 14, 3, 0, 6, 9, 10, 1, 2, 8, 5, 11, 12, 4, 15, 13, 8, 11, 5, 6, 15, 0, 3, 4, 7, 2, 12, 1, 10, 14, 9,
     10, 6, 9, 0, 12, 11, 7, 13, 15, 1, 3, 14, 5, 2, 8, 4, 3, 15, 0, 6, 10, 1, 13, 8, 9, 4, 5, 11, 12, 7, 2, 14],
    [2, 12, 4, 1, 7, 10, 11, 6, 8, 5, 3, 15, 13, 0, 14, 9, 14, 11, 2, 12, 4, 7, 13, 1, 5, 0, 15, 10, 3, 9, 8, 6,
     4, 2, 1, 11, 10, 13, 7, 8, 15, 9, 12, 5, 6, 3, 0, 14, 11, 8, 12, 7, 1, 14, 2, 13, 6, 15, 0, 9, 10, 4, 5, 3],
    [12, 1, 10, 15, 9, 2, 6, 8, 0, 13, 3, 4, 14, 7, 5, 11, 10, 15, 4, 2, 7, 12, 9, 5, 6, 1, 13, 14, 0, 11, 3, 8,
     9, 14, 15, 5, 2, 8, 12, 3, 7, 0, 4, 10, 1, 13, 11, 6, 4, 3, 2, 12, 9, 5, 15, 10, 11, 14, 1, 7, 6, 0, 8, 13],
    [4, 11, 2, 14, 15, 0, 8, 13, 3, 12, 9, 7, 5, 10, 6, 1, 13, 0, 11, 7, 4, 9, 1, 10, 14, 3, 5, 12, 2, 15, 8, 6,
     1, 4, 11, 13, 12, 3, 7, 14, 10, 15, 6, 8, 0, 5, 9, 2, 6, 11, 13, 8, 1, 4, 10, 7, 9, 5, 0, 15, 14, 2, 3, 12],
    [13, 2, 8, 4, 6, 15, 11, 1, 10, 9, 3, 14, 5, 0, 12, 7, 1, 15, 13, 8, 10, 3, 7, 4, 12, 5, 6, 11, 0, 14, 9, 2,
     7, 11, 4, 1, 9, 12, 14, 2, 0, 6, 10, 13, 15, 3, 5, 8, 2, 1, 14, 7, 4, 10, 8, 13, 15, 12, 9, 0, 3, 5, 6, 11],
]
FULL = (1 << 64) - 1
DECAY = 1


def sbox_value(box: int, x: int) -> int:
    """S-box `box` on the 6-bit input x = b1..b6 (b1 the most significant): row b1b6, column b2..b5."""
    row = ((x >> 4) & 2) | (x & 1)
    col = (x >> 1) & 15
    return SBOX[box][row * 16 + col]


def input_tt(k: int) -> int:
    """Truth table of input a(k+1): bit x set when input bit b(k+1) of x is 1."""
    return sum(1 << x for x in range(64) if (x >> (5 - k)) & 1)


def output_tt(box: int, j: int) -> int:
    return sum(1 << x for x in range(64) if (sbox_value(box, x) >> (3 - j)) & 1)


INPUTS = [input_tt(k) for k in range(6)]


class Circuit:
    """Nodes 0..5 are the inputs; every other node is one gate over earlier nodes."""

    def __init__(self):
        self.tts = list(INPUTS)
        self.gates = [None] * 6            # (op, i, j) per node; None for inputs
        self.index = {tt: i for i, tt in enumerate(self.tts)}

    def copy(self):
        c = Circuit.__new__(Circuit)
        c.tts, c.gates, c.index = list(self.tts), list(self.gates), dict(self.index)
        return c

    def add(self, op, i, j=None):
        a = self.tts[i]
        b = self.tts[j] if j is not None else 0
        tt = {"and": a & b, "or": a | b, "xor": a ^ b, "andn": a & ~b & FULL, "not": ~a & FULL}[op]
        if tt in self.index:
            return self.index[tt]
        self.tts.append(tt)
        self.gates.append((op, i, j))
        self.index[tt] = len(self.tts) - 1
        return len(self.tts) - 1

    def cost(self):
        return len(self.tts) - 6

    def find(self, target, care):
        """A node equal to target wherever care is set, reusing nodes or adding one gate."""
        t = target & care
        for i, tt in enumerate(self.tts):
            if (tt ^ target) & care == 0:
                return i
        # XOR: b = a ^ target on care
        masked = {}
        for i, tt in enumerate(self.tts):
            masked.setdefault(tt & care, i)
        for i, tt in enumerate(self.tts):
            j = masked.get((tt ^ target) & care)
            if j is not None and j != i:
                return self.add("xor", i, j)
        # AND: both operands cover target; OR: both inside target; ANDN: a covers, b disjoint
        cover = [i for i, tt in enumerate(self.tts) if (t & ~tt) == 0]
        inside = [i for i, tt in enumerate(self.tts) if (tt & care & ~t) == 0]
        disjoint = [i for i, tt in enumerate(self.tts) if (tt & t) == 0]
        for x, i in enumerate(cover):
            for j in cover[x + 1:]:
                if (self.tts[i] & self.tts[j] ^ target) & care == 0:
                    return self.add("and", i, j)
        for x, i in enumerate(inside):
            for j in inside[x + 1:]:
                if ((self.tts[i] | self.tts[j]) ^ target) & care == 0:
                    return self.add("or", i, j)
        for i in cover:
            for j in disjoint:
                if ((self.tts[i] & ~self.tts[j]) ^ target) & care == 0:
                    return self.add("andn", i, j)
        for i, tt in enumerate(self.tts):
            if (~tt ^ target) & care == 0:
                return self.add("not", i)
        return None


def build(c: Circuit, target: int, care: int, free: tuple, width: int):
    """Return (circuit, node) computing target on care; `width` = how many select inputs to try."""
    c = c.copy()
    node = c.find(target, care)
    if node is not None:
        return c, node
    best = None
    tries = []
    for v in free:
        V = INPUTS[v]
        rest = tuple(w for w in free if w != v)
        tries.append((v, V, rest))
    for v, V, rest in tries[:width] if width < len(tries) else tries:
        sub = max(1, width - DECAY)
        # f = f0 ^ (v & h): f0 right where v = 0, h right where v = 1
        c0, f0 = build(c, target, care & ~V & FULL, rest, sub)
        h_target = target ^ c0.tts[f0]
        c1, h = build(c0, h_target, care & V, rest, sub)
        g = c1.add("and", v, h)
        r = c1.add("xor", f0, g)
        if best is None or c1.cost() < best[0].cost():
            best = (c1, r)
        # f = f1 ^ (h & ~v)
        c0, f1 = build(c, target, care & V, rest, sub)
        h_target = target ^ c0.tts[f1]
        c1, h = build(c0, h_target, care & ~V & FULL, rest, sub)
        g = c1.add("andn", h, v)
        r = c1.add("xor", f1, g)
        if best is None or c1.cost() < best[0].cost():
            best = (c1, r)
    return best


def order_vars(target):
    return tuple(range(6))


def best_circuit(box: int, width: int):
    targets = [output_tt(box, j) for j in range(4)]
    best = None
    for order in itertools.permutations(range(4)):
        c = Circuit()
        outs = [None] * 4
        for j in order:
            c, outs[j] = build(c, targets[j], FULL, tuple(range(6)), width)
            if best is not None and c.cost() >= best[0].cost():
                break
        else:
            if best is None or c.cost() < best[0].cost():
                best = (c, outs)
    c, outs = best
    for j in range(4):
        assert c.tts[outs[j]] == targets[j]
    return best


def emit(box: int, c: Circuit, outs: list[int]) -> str:
    """A C macro: DES_SBOXn(a1..a6, o1..o4) xors the four outputs into o1..o4 (lvalues of type V).
    The inputs are bound once (they may be expressions)."""
    name = lambda i: f"i{i + 1}" if i < 6 else f"t{i - 6}"
    lines = [f"/* S{box + 1}: {c.cost()} gates */",
             f"#define DES_SBOX{box + 1}(a1, a2, a3, a4, a5, a6, o1, o2, o3, o4) do {{ \\",
             "    const V i1 = (a1), i2 = (a2), i3 = (a3), i4 = (a4), i5 = (a5), i6 = (a6); \\"]
    for i in range(6, len(c.tts)):
        op, x, y = c.gates[i]
        if op == "not":
            expr = f"~{name(x)}"
        else:
            expr = f"{name(x)} {dict(andn='& ~', **{'and': '&', 'or': '|', 'xor': '^'})[op]} {name(y)}"
            expr = expr.replace("& ~ ", "& ~")
        lines.append(f"    const V {name(i)} = {expr}; \\")
    for j in range(4):
        lines.append(f"    (o{j + 1}) ^= {name(outs[j])}; \\")
    lines.append("} while (0)")
    return "\n".join(lines)


# FIPS 46-3: the expansion E and the permutation P (1-based bit numbers)
E = [32, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 8, 9, 10, 11, 12, 13, 12, 13, 14, 15, 16, 17,
     16, 17, 18, 19, 20, 21, 20, 21, 22, 23, 24, 25, 24, 25, 26, 27, 28, 29, 28, 29, 30, 31, 32, 1]
P = [16, 7, 20, 21, 29, 12, 28, 17, 1, 15, 23, 26, 5, 18, 31, 10,
     2, 8, 24, 14, 32, 27, 3, 9, 19, 13, 30, 6, 22, 11, 4, 25]


def emit_round() -> str:
    """DES_BS_ROUND(src, dst, key, ks): dst ^= f(src, subkey) with the eight S-boxes; E and P are
    folded into the indices (free in bitsliced form); ks[0..47] = key bit index of each subkey bit."""
    pinv = [P.index(b + 1) for b in range(32)]      # S-box output bit b lands at f position pinv[b]
    lines = ["#define DES_BS_ROUND(src, dst, key, ks) do { \\"]
    for s in range(8):
        ins = ", ".join(f"(src)[{E[6 * s + k] - 1}] ^ (key)[(ks)[{6 * s + k}]]" for k in range(6))
        outs = ", ".join(f"(dst)[{pinv[4 * s + j]}]" for j in range(4))
        lines.append(f"    DES_SBOX{s + 1}({ins}, {outs}); \\")
    lines.append("} while (0)")
    return "\n".join(lines)


def main():
    width = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    parts, counts = [], []
    for box in range(8):
        c, outs = best_circuit(box, width)
        counts.append(c.cost())
        print(f"S{box + 1}: {c.cost()} gates", file=sys.stderr)
        parts.append(emit(box, c, outs))
    print("/* Generated by tools/gen_des_sboxes.py from the FIPS 46-3 S-box tables; do not edit.")
    print(f" * Gate counts: {' '.join(map(str, counts))} (average {sum(counts) / 8:.2f}).")
    print(" * Method: M. Kwan, \"Reducing the Gate Count of Bitslice DES\", IACR ePrint 2000/051.")
    print(" * Each macro needs a type V in scope (a uint64_t or a gcc vector of them). */")
    print("#pragma once\n")
    print("\n\n".join(parts))
    print()
    print(emit_round())


if __name__ == "__main__":
    main()

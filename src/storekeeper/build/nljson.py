"""JSON text as nlohmann's ``dump()`` writes it (what Nix 2.8 writes ``.attrs.json`` with).

Invariant kept here: :func:`render_json` gives nlohmann's bytes for the same
document: compact, object keys in byte order, only ``"``, ``\\`` and control
characters escaped (``\\u00xx`` in lower case, non-ASCII as is), doubles with
Grisu2's digits in nlohmann's layout (a point or an exponent always; exponents
from 16 integral digits on, or below 1e-4).  Checked against nix-daemon's own
files in tests/test_drv_env.py.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from fractions import Fraction
from typing import Any

# Doubles: nlohmann prints Grisu2's digits (Loitsch, "Printing Floating-Point Numbers
# Quickly and Accurately with Integers", 2010: 64-bit significands, cached powers of
# ten every 8 decades from 10^-300, target exponents -60..-32).  They round-trip but
# are not always the shortest (9.020540000000001e+20 where repr gives 9.02054e+20).

_M64 = (1 << 64) - 1


@functools.lru_cache(maxsize=None)
def _cached_power(k: int) -> tuple[int, int]:
    """10**k as a normalised (64-bit significand, binary exponent), rounded to nearest."""
    v = Fraction(10) ** k
    e = v.numerator.bit_length() - v.denominator.bit_length() - 64
    while v / Fraction(2) ** e >= 1 << 64:
        e += 1
    while v / Fraction(2) ** e < 1 << 63:
        e -= 1
    return round(v / Fraction(2) ** e), e


def _mul(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return (a[0] * b[0] + (1 << 63)) >> 64, a[1] + b[1] + 64


def _normalize(f: int, e: int) -> tuple[int, int]:
    shift = 64 - f.bit_length()
    return f << shift, e - shift


def _grisu2(x: float) -> tuple[str, int]:
    """Digits and decimal exponent (x == int(digits) * 10**exp) of finite x > 0."""
    bits = struct.unpack("<Q", struct.pack("<d", x))[0]
    big_e, frac = bits >> 52, bits & ((1 << 52) - 1)
    f, e = (frac, 1 - 1075) if big_e == 0 else (frac + (1 << 52), big_e - 1075)
    plus = _normalize(2 * f + 1, e - 1)
    lower = (4 * f - 1, e - 2) if frac == 0 and big_e > 1 else (2 * f - 1, e - 1)
    minus = (lower[0] << (lower[1] - plus[1]), plus[1])
    w = _normalize(f, e)
    t = -60 - plus[1] - 1
    k = int(t * 78913 / (1 << 18)) + (t > 0)  # (C division: towards zero)
    k = -300 + 8 * ((300 + k + 7) // 8)
    c = _cached_power(k)
    w, w_minus, w_plus = _mul(w, c), _mul(minus, c), _mul(plus, c)
    m_minus, m_plus, shift = w_minus[0] + 1, w_plus[0] - 1, -w_plus[1]
    delta, dist = m_plus - m_minus, m_plus - w[0]
    one = 1 << shift
    p1, p2 = m_plus >> shift, m_plus & (one - 1)
    digits, exp = [], -k
    n = len(str(p1))
    pow10 = 10 ** (n - 1)
    while n > 0:
        d, p1 = divmod(p1, pow10)
        digits.append(d)
        n -= 1
        rest = (p1 << shift) + p2
        if rest <= delta:
            return _round(digits, dist, delta, rest, pow10 << shift), exp + n
        pow10 //= 10
    m = 0
    while True:
        p2 *= 10
        digits.append(p2 >> shift)
        p2 &= one - 1
        m += 1
        delta, dist = (delta * 10) & _M64, (dist * 10) & _M64
        if p2 <= delta:
            return _round(digits, dist, delta, p2, one), exp - m


def _round(digits: list[int], dist: int, delta: int, rest: int, ten_k: int) -> str:
    while rest < dist and delta - rest >= ten_k and \
            (rest + ten_k < dist or dist - rest > rest + ten_k - dist):
        digits[-1] -= 1
        rest += ten_k
    return "".join(map(str, digits))


def _double(x: float) -> str:
    if math.isnan(x) or math.isinf(x):
        return "null"
    out = "-" if math.copysign(1, x) < 0 else ""
    if x == 0:
        return out + "0.0"
    digits, exp = _grisu2(abs(x))
    k = len(digits)
    n = k + exp  # the decimal point's place, counted from the first digit
    if k <= n <= 15:
        return out + digits + "0" * (n - k) + ".0"
    if 0 < n <= 15:
        return out + digits[:n] + "." + digits[n:]
    if -4 < n <= 0:
        return out + "0." + "0" * -n + digits
    e = n - 1
    mant = digits if k == 1 else digits[0] + "." + digits[1:]
    return f"{out}{mant}e{'-' if e < 0 else '+'}{abs(e):02d}"


def render_json(value: Any) -> str:
    """nlohmann's compact ``dump()`` of ``value``."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _double(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ",".join(render_json(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + render_json(value[k])
                              for k in sorted(value, key=key_bytes)) + "}"
    raise TypeError(f"not a JSON value: {value!r}")


def key_bytes(key: str) -> bytes:
    return key.encode("utf-8", "surrogatepass")

"""Hash digests and their textual forms: base16, Nix base32 ("nix32"), base64, SRI.

Nix base32 is not RFC 4648: the digest is read as a little-endian bit string and
the *last* output character holds bits 0..4.  See spec §1.2.
"""

from __future__ import annotations

import binascii

from .errors import FormatError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (cold start)
if TYPE_CHECKING:
    import hashlib

NIX32_ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_NIX32_INDEX = {c: i for i, c in enumerate(NIX32_ALPHABET)}

#: digest size in bytes of every algorithm Nix knows
ALGO_SIZES = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}


def nix32_len(nbytes: int) -> int:
    return (nbytes * 8 - 1) // 5 + 1


#: the two characters of each 10-bit group (high 5 bits first)
_NIX32_PAIRS = [a + b for a in NIX32_ALPHABET for b in NIX32_ALPHABET]


def nix32_encode(digest: bytes) -> str:
    # The whole digest as one little-endian integer: character n from the end
    # holds bits 5n..5n+4, which is exactly Nix's byte-walking loop.  Two
    # characters per step (every narinfo and path info is printed with it).
    value = int.from_bytes(digest, "little")
    n = nix32_len(len(digest)) if digest else 0
    head = NIX32_ALPHABET[(value >> (5 * (n - 1))) & 31] if n % 2 else ""
    pairs = _NIX32_PAIRS
    return head + "".join([pairs[(value >> (5 * k)) & 1023] for k in range(n - 2 - n % 2, -1, -2)])


def nix32_decode(text: str, nbytes: int | None = None) -> bytes:
    """Decode nix32; ``nbytes`` defaults to the largest size the length allows."""
    if nbytes is None:
        nbytes = len(text) * 5 // 8
    if nix32_len(nbytes) != len(text):
        raise FormatError(f"nix32 string of length {len(text)} cannot hold {nbytes} bytes")
    value = 0
    for ch in text:
        digit = _NIX32_INDEX.get(ch)
        if digit is None:
            raise FormatError(f"invalid character {ch!r} in nix32 string {text!r}")
        value = (value << 5) | digit
    if value >> (8 * nbytes):
        raise FormatError(f"invalid nix32 string {text!r}: non-zero bits beyond the digest")
    return value.to_bytes(nbytes, "little")


def compress_hash(digest: bytes, size: int = 20) -> bytes:
    """Fold a digest into ``size`` bytes by XOR (Nix's compressHash)."""
    out = bytearray(size)
    for i, b in enumerate(digest):
        out[i % size] ^= b
    return bytes(out)


def new_hasher(algo: str) -> "hashlib._Hash":
    # (imported here: loading OpenSSL is ~2 ms of the start of commands that hash nothing)
    import hashlib  # noqa: PLC0415
    if algo not in ALGO_SIZES:
        raise FormatError(f"unknown hash algorithm {algo!r}")
    return hashlib.new(algo)


class Hash:
    """A digest tagged with its algorithm: a frozen value (equal and hashed by both).

    A plain class, not a dataclass: importing dataclasses (and inspect with it) would
    double the start of every command (bench/startup.py, issue 12).
    """

    __slots__ = ("algo", "digest")
    algo: str
    digest: bytes

    def __init__(self, algo: str, digest: bytes) -> None:
        size = ALGO_SIZES.get(algo)
        if size is None:
            raise FormatError(f"unknown hash algorithm {algo!r}")
        if len(digest) != size:
            raise FormatError(f"{algo} digest must be {size} bytes, got {len(digest)}")
        object.__setattr__(self, "algo", algo)
        object.__setattr__(self, "digest", digest)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field '{name}' of a Hash")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field '{name}' of a Hash")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Hash) and other.__class__ is self.__class__:
            return self.algo == other.algo and self.digest == other.digest
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.algo, self.digest))

    def __repr__(self) -> str:
        return f"Hash(algo={self.algo!r}, digest={self.digest!r})"

    def __reduce__(self) -> tuple[type[Hash], tuple[str, bytes]]:
        return (self.__class__, (self.algo, self.digest))

    @classmethod
    def of(cls, algo: str, data: bytes) -> "Hash":
        h = new_hasher(algo)
        h.update(data)
        return cls(algo, h.digest())

    @property
    def base16(self) -> str:
        return self.digest.hex()

    @property
    def nix32(self) -> str:
        return nix32_encode(self.digest)

    @property
    def base64(self) -> str:
        return binascii.b2a_base64(self.digest, newline=False).decode()

    @property
    def sri(self) -> str:
        return f"{self.algo}-{self.base64}"

    def typed(self, encoding: str = "base16") -> str:
        """``algo:digest`` in the given encoding (base16, nix32 or base64)."""
        return f"{self.algo}:{self.encode(encoding)}"

    def encode(self, encoding: str) -> str:
        if encoding == "base16":
            return self.base16
        if encoding in ("nix32", "base32"):
            return self.nix32
        if encoding == "base64":
            return self.base64
        if encoding == "sri":
            return self.sri
        raise FormatError(f"unknown hash encoding {encoding!r}")

    @classmethod
    def parse(cls, text: str, algo: str | None = None) -> "Hash":
        """Parse ``algo:digest``, SRI ``algo-base64``, or a bare digest of ``algo``.

        The digest's encoding (base16, nix32, base64) is chosen by its length,
        as Nix does.
        """
        body = text
        if ":" in text:
            prefix, body = text.split(":", 1)
            algo = _check_algo(prefix, algo, text)
        elif "-" in text and text.split("-", 1)[0] in ALGO_SIZES:
            prefix, body = text.split("-", 1)
            algo = _check_algo(prefix, algo, text)
            return cls(algo, _decode_base64(body, algo, text))
        if algo is None:
            raise FormatError(f"hash {text!r} does not say its algorithm")
        size = ALGO_SIZES.get(algo)
        if size is None:
            raise FormatError(f"unknown hash algorithm {algo!r}")
        if len(body) == 2 * size:
            try:
                return cls(algo, bytes.fromhex(body))
            except ValueError:
                raise FormatError(f"invalid base16 hash {text!r}") from None
        if len(body) == nix32_len(size):
            return cls(algo, nix32_decode(body, size))
        return cls(algo, _decode_base64(body, algo, text))


def _check_algo(prefix: str, expected: str | None, text: str) -> str:
    if prefix not in ALGO_SIZES:
        raise FormatError(f"unknown hash algorithm {prefix!r} in {text!r}")
    if expected is not None and expected != prefix:
        raise FormatError(f"hash {text!r} should be {expected}")
    return prefix


def _decode_base64(body: str, algo: str, text: str) -> bytes:
    size = ALGO_SIZES[algo]
    if len(body) != 4 * ((size + 2) // 3):
        raise FormatError(f"hash {text!r} has the wrong length for {algo}")
    # base64.b64decode(body, validate=True), spelt out: the base64 module imports re
    try:
        data = body.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError("string argument should contain only ASCII characters") from None
    try:
        digest = binascii.a2b_base64(data, strict_mode=True)
    except binascii.Error:
        raise FormatError(f"invalid base64 hash {text!r}") from None
    if len(digest) != size:
        raise FormatError(f"hash {text!r} has the wrong length for {algo}")
    return digest

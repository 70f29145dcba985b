"""ed25519 signatures on store paths: Nix's key files, the fingerprint, sign and verify.

This is the one module that does cryptography (with ``cryptography``).  It stays
in ``formats`` because it is pure computation on bytes: keys come in as text,
signatures go out as text; reading key files is the caller's business.

* Key file text (spec binary-cache.md §5.1): ``<name>:<base64>``, split at the
  first ``:``; base64 decoding skips ``\\n``, stops at the first ``=`` and
  rejects any other character outside the alphabet, as Nix's decoder does.
  Secret keys are libsodium's 64 bytes (seed ‖ public key), public keys 32.
* Fingerprint (§5.2): ``1;<path>;<sha256:nix32 NarHash>;<NarSize>;<refs>``
  with the references' full paths sorted and joined by ``,``.
* Trust (§5.3): a path info is trusted if its CA reproduces its path, or one
  signature by a trusted key name verifies.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

from .contentaddress import ContentAddress
from .errors import FormatError
from .pathinfo import ValidPathInfo
from .storepath import StoreDir

if TYPE_CHECKING:
    from types import ModuleType


def _ed25519() -> ModuleType:
    """``cryptography``'s ed25519 module, imported on first use: importing it costs
    ~15 ms, and every command that opens a local store imports this module (through
    the store's trust check) while only signing and checking signatures need it."""
    from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: PLC0415 -- see above
    return ed25519

_B64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")

#: Nix's default ``trusted-public-keys``
CACHE_NIXOS_ORG_KEY = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="


class SignatureError(FormatError):
    """A key or signature is malformed (not: a signature that does not verify)."""


def nix_base64_decode(text: str, what: str) -> bytes:
    body = text.replace("\n", "").split("=", 1)[0]
    bad = next((c for c in body if c not in _B64), None)
    if bad is not None:
        raise SignatureError(f"{what}: invalid character {bad!r} in Base64 string")
    try:
        return base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except binascii.Error:
        raise SignatureError(f"{what}: invalid Base64 string") from None


def _split(text: str, what: str) -> tuple[str, bytes]:
    name, sep, b64 = text.partition(":")
    if not sep or not name or not b64.strip("\n"):
        raise SignatureError(f"{what} is corrupt")
    return name, nix_base64_decode(b64, what)


@dataclass(frozen=True, slots=True)
class PublicKey:
    name: str
    key: bytes  # 32 bytes

    @classmethod
    def parse(cls, text: str) -> "PublicKey":
        name, raw = _split(text, "public key")
        if len(raw) != 32:
            raise SignatureError(f"public key '{name}' is not valid")
        return cls(name, raw)

    def render(self) -> str:
        return f"{self.name}:{base64.b64encode(self.key).decode()}"

    def verify(self, message: bytes, sig: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature  # noqa: PLC0415 -- see _ed25519
        try:
            _ed25519().Ed25519PublicKey.from_public_bytes(self.key).verify(sig, message)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True, slots=True)
class SecretKey:
    name: str
    key: bytes  # 64 bytes: seed ‖ public key

    @classmethod
    def parse(cls, text: str) -> "SecretKey":
        name, raw = _split(text, "secret key")
        if len(raw) != 64:
            raise SignatureError(f"secret key '{name}' is not valid")
        if _public_of(raw[:32]) != raw[32:]:
            raise SignatureError(f"secret key '{name}' is not valid: its public half does not match")
        return cls(name, raw)

    @classmethod
    def generate(cls, name: str) -> "SecretKey":
        if not name or ":" in name:
            raise SignatureError(f"key name {name!r} must be non-empty and contain no ':'")
        seed = _ed25519().Ed25519PrivateKey.generate().private_bytes_raw()
        return cls(name, seed + _public_of(seed))

    def render(self) -> str:
        return f"{self.name}:{base64.b64encode(self.key).decode()}"

    def public(self) -> PublicKey:
        return PublicKey(self.name, self.key[32:])

    def sign(self, message: bytes) -> str:
        """``<name>:<base64 signature>``: a narinfo ``Sig`` value."""
        sig = _ed25519().Ed25519PrivateKey.from_private_bytes(self.key[:32]).sign(message)
        return f"{self.name}:{base64.b64encode(sig).decode()}"


def _public_of(seed: bytes) -> bytes:
    public: bytes = _ed25519().Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
    return public


def fingerprint(store_dir: StoreDir, info: ValidPathInfo) -> bytes:
    """The message a path's signatures sign (spec §5.2)."""
    if info.nar_size == 0:
        raise SignatureError(f"cannot calculate fingerprint of path '{store_dir.print(info.path)}' "
                             "because its size is not known")
    if info.nar_hash.algo != "sha256":
        raise SignatureError(f"cannot calculate fingerprint of path '{store_dir.print(info.path)}' "
                             "because its NAR hash is not SHA-256")
    refs = ",".join(sorted(store_dir.print(r) for r in info.references))
    return (f"1;{store_dir.print(info.path)};{info.nar_hash.typed('nix32')};"
            f"{info.nar_size};{refs}").encode()


def sign_info(store_dir: StoreDir, info: ValidPathInfo, key: SecretKey) -> str:
    return key.sign(fingerprint(store_dir, info))


def parse_public_keys(texts: Iterable[str]) -> dict[str, PublicKey]:
    """``trusted-public-keys`` entries by name; the first key of a name wins (as Nix)."""
    keys: dict[str, PublicKey] = {}
    for t in texts:
        k = PublicKey.parse(t)
        keys.setdefault(k.name, k)
    return keys


def verify_sig(store_dir: StoreDir, info: ValidPathInfo, sig: str,
               keys: Mapping[str, PublicKey]) -> bool:
    """Does ``sig`` verify with a trusted key?  Untrusted names count as no; a trusted
    name with a signature that is not 64 bytes of base64 is an error (as Nix)."""
    name, sep, b64 = sig.partition(":")
    key = keys.get(name) if sep else None
    if key is None:
        return False
    raw = nix_base64_decode(b64, f"signature '{sig}'")
    if len(raw) != 64:
        raise SignatureError(f"signature '{sig}' is not valid")
    return key.verify(fingerprint(store_dir, info), raw)


def is_content_addressed(store_dir: StoreDir, info: ValidPathInfo) -> bool:
    """Does the CA field reproduce the path (the CA exemption of spec §5.3)?"""
    if not info.ca:
        return False
    try:
        ca = ContentAddress.parse(info.ca)
        self_ref = info.path in info.references
        return ca.store_path(store_dir, info.path.name, info.references - {info.path},
                             self_ref) == info.path
    except FormatError:
        return False


def is_trusted(store_dir: StoreDir, info: ValidPathInfo, keys: Mapping[str, PublicKey]) -> bool:
    """The trust rule of spec §5.3 (``require-sigs`` is the caller's)."""
    if is_content_addressed(store_dir, info):
        return True
    return any(verify_sig(store_dir, info, s, keys) for s in sorted(info.sigs))


def count_valid_sigs(store_dir: StoreDir, info: ValidPathInfo,
                     keys: Mapping[str, PublicKey]) -> int:
    """How many of ``info``'s signatures verify with a trusted key."""
    return sum(verify_sig(store_dir, info, s, keys) for s in sorted(info.sigs))


def has_enough_sigs(store_dir: StoreDir, info: ValidPathInfo, keys: Mapping[str, PublicKey],
                    sigs_needed: int = 0) -> bool:
    """``nix store verify``'s rule: a path built here (``ultimate``) is trusted when no
    count is asked for; a content-addressed one always; else ``max(1, sigs_needed)``
    signatures by trusted keys."""
    if info.ultimate and not sigs_needed:
        return True
    if is_content_addressed(store_dir, info):
        return True
    return count_valid_sigs(store_dir, info, keys) >= max(1, sigs_needed)

"""``builtin:fetchurl``: download ``url`` to ``$out``, as Nix 2.8's ``<nix/fetchurl.nix>``
derivations expect.

Attributes: ``out``, ``url``; ``unpack = "1"``: the download is a NAR (``.xz``
compressed if the URL ends in ``.xz``) unpacked at ``$out``; ``executable =
"1"``: ``$out`` is made 0755.  Nothing here checks the hash: the derivation is
fixed-output, and the builder that runs us checks ``$out`` against
``outputHash`` like any fixed output, so TLS certificates are not verified
either (as in Nix).  ``http_proxy`` and friends reach us through
``impureEnvVars`` and are honoured.

URLs: ``file://`` (read here, following links as curl does: the file is read
as the build user), ``http://`` and ``https://`` (redirects followed).  A
connection that fails is retried up to 5 attempts, 250 ms doubling between
them, each retry announced with Nix's warning; an HTTP error status is not,
except 408, 429 and 5xx.  Nix's ``hashed-mirrors`` are not consulted (the
setting is empty by default and not passed to builtins here).

``$out`` is created with ``O_EXCL | O_NOFOLLOW`` (a NAR is unpacked fd-relative
under it): nothing is written anywhere else.
"""

from __future__ import annotations

import lzma
import os
import random
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import BinaryIO

from ... import fs
from ...formats.nar import NarError
from ...formats.wire import ActivityType, ResultType, Verbosity
from ...fs.narfs import restore_nar
from .common import Activity, Attrs, BuiltinError, shown, warn

TRIES = 5
_BASE_DELAY_MS = 250
_CHUNK = 1 << 16
_O_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class _Transient(Exception):
    """A failure worth another attempt (nothing was written yet)."""


def _open_file_url(url: str) -> BinaryIO:
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    try:
        f = open(path, "rb")
        os.read(f.fileno(), 0)  # a directory fails here, as curl fails to read it
        return f
    except OSError:
        raise BuiltinError(f"unable to download '{url}': Couldn't read a file:// file (37)") from None


def _open_http(url: str) -> BinaryIO:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the output hash is checked instead
    req = urllib.request.Request(url, headers={"User-Agent": "curl/7.81.0 Nix/2.8.1"})
    try:
        return urllib.request.urlopen(req, context=ctx, timeout=300)
    except urllib.error.HTTPError as e:
        reason = (e.reason or "").strip() if isinstance(e.reason, str) else ""
        message = f"unable to download '{url}': HTTP error {e.code}"
        if reason:
            message += f" ('{reason}')"
        try:
            body = e.read().decode("utf-8", "replace").rstrip("\n")
        except OSError:
            body = ""
        finally:
            e.close()
        if body:
            message += f"\n\nresponse body:\n\n{shown(body)}"
        if e.code in (408, 429) or 500 <= e.code < 600:
            raise _Transient(message) from None
        raise BuiltinError(message) from None
    except urllib.error.URLError as e:
        why = e.reason
        if isinstance(why, ConnectionRefusedError):
            text = "Couldn't connect to server (7)"
        elif isinstance(why, OSError) and why.strerror:
            text = why.strerror
        else:
            text = str(why)
        raise _Transient(f"unable to download '{url}': {text}") from None
    except (OSError, ValueError) as e:
        raise _Transient(f"unable to download '{url}': {e}") from None


def open_url(url: str) -> BinaryIO:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "file":
        return _open_file_url(url)
    if scheme not in ("http", "https"):
        raise BuiltinError(f"unable to download '{url}': Unsupported protocol (1)")
    for attempt in range(1, TRIES + 1):
        try:
            return _open_http(url)
        except _Transient as e:
            if attempt == TRIES:
                raise BuiltinError(str(e)) from None
            delay = int(_BASE_DELAY_MS * 2 ** (attempt - 1) * (1 + random.random()))
            warn(f"error: {e}; retrying in {delay} ms")
            time.sleep(delay / 1000)
    raise AssertionError("unreachable")


class _Reader:
    """A file-like read() over the download that reports a broken transfer as
    Nix's download error."""

    def __init__(self, f: BinaryIO, url: str, xz: bool) -> None:
        self.f, self.url = f, url
        self.xz = lzma.LZMADecompressor() if xz else None
        self.pending = b""
        self.received = 0

    def _raw(self, n: int) -> bytes:
        try:
            data = self.f.read(n)
        except OSError as e:
            raise BuiltinError(f"unable to download '{self.url}': {e}") from None
        self.received += len(data)
        return data

    def read(self, n: int = -1) -> bytes:
        if self.xz is None:
            return self._raw(n if n >= 0 else -1)
        want = n if n >= 0 else 1 << 62
        while len(self.pending) < want and not self.xz.eof:
            chunk = self._raw(_CHUNK)
            if not chunk:
                if not self.xz.eof:
                    raise BuiltinError(f"unable to download '{self.url}': truncated xz data")
                break
            try:
                self.pending += self.xz.decompress(chunk)
            except lzma.LZMAError as e:
                raise BuiltinError(f"unable to download '{self.url}': {e}") from None
        out, self.pending = self.pending[:want], self.pending[want:]
        return out


def fetch(out: str, url: str, unpack: bool, executable: bool) -> None:
    # (reported as Nix's download activity: the client shows "downloading '…'")
    with Activity(Verbosity.TALKATIVE, ActivityType.FILE_TRANSFER, f"downloading '{url}'",
                  [url]) as act, open_url(url) as f:
        reader = _Reader(f, url, xz=unpack and url.endswith(".xz"))
        if unpack:
            try:
                restore_nar(reader, out)
            except NarError as e:
                raise BuiltinError(f"unpacking the NAR from '{url}': {e}") from None
        else:
            fd = os.open(out, _O_CREATE, 0o666)
            try:
                while chunk := reader.read(_CHUNK):
                    fs.write_all(fd, chunk)
            finally:
                os.close(fd)
        act.result(ResultType.PROGRESS, [reader.received, reader.received, 0, 0])
    if executable:
        fd = fs.open_handle(out)
        try:
            fs.chmod_fd(fd, 0o755)
        except OSError as e:
            raise BuiltinError(f"making '{shown(out)}' executable: {e.strerror}") from None
        finally:
            os.close(fd)


def run(attrs: Attrs) -> None:
    fetch(attrs.get("out"), attrs.get("url"), attrs.flag("unpack"), attrs.flag("executable"))

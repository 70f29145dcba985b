"""``builtin:unpack-channel``: a channel tarball unpacked for ``nix-channel --update``.

Attributes: ``out``, ``src`` (the tarball: plain, gzip, bzip2 or xz), and
``channelName``.  The tarball must hold exactly one top-level entry, which
ends up as ``$out/<channelName>`` (Nix 2.8's error otherwise: "channel tarball
'…' contains more than one file").

The tarball is untrusted: every member is created fd-relative under ``$out``
(parents opened ``O_NOFOLLOW``, files ``O_CREAT | O_EXCL | O_NOFOLLOW``), a
name that is absolute or has a ``..`` component is refused, hard links must
name a member already extracted (linked without following links), and
devices, fifos and the like are refused.  So no member, and no symlink an
earlier member made, can direct a write outside ``$out``.  Modes keep only
the permission bits (the store canonicalises them afterwards); owners, times
and extended attributes are not restored.
"""

from __future__ import annotations

import os
import posixpath
import tarfile

from ... import fs
from .common import Attrs, BuiltinError, shown

_O_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 16


def _parts(name: str, src: str) -> list[str]:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts:
        raise BuiltinError(f"unpacking {shown(src)}: refusing member '{shown(name)}' "
                           "(absolute, or with a '..' component)")
    return parts


class _Extractor:
    """Members of one tarball, made under the directory open at ``top_fd``."""

    def __init__(self, top_fd: int, src: str) -> None:
        self.top_fd = top_fd
        self.src = src

    def _parent(self, parts: list[str]) -> int:
        """A new fd on the directory that holds ``parts[-1]`` (made if missing)."""
        fd = os.dup(self.top_fd)
        try:
            for p in parts[:-1]:
                try:
                    os.mkdir(p, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                nfd = fs.open_dir(p, fd)  # a symlink here is ELOOP: never followed
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def member(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = _parts(m.name, self.src)
        if not parts:
            return  # "./": $out itself
        dfd = self._parent(parts)
        name = parts[-1]
        try:
            if m.isdir():
                try:
                    os.mkdir(name, (m.mode & 0o777) | 0o700, dir_fd=dfd)
                except FileExistsError:
                    os.close(fs.open_dir(name, dfd))  # must be a real directory, not a link
            elif m.issym():
                os.symlink(m.linkname, name, dir_fd=dfd)
            elif m.islnk():
                target = _parts(m.linkname, self.src)
                tfd = self._parent(target)
                try:
                    os.link(target[-1], name, src_dir_fd=tfd, dst_dir_fd=dfd,
                            follow_symlinks=False)
                finally:
                    os.close(tfd)
            elif m.isfile():
                data = tar.extractfile(m)
                assert data is not None
                fd = os.open(name, _O_CREATE, m.mode & 0o777, dir_fd=dfd)
                try:
                    while chunk := data.read(_CHUNK):
                        fs.write_all(fd, chunk)
                finally:
                    os.close(fd)
            else:
                raise BuiltinError(f"unpacking {shown(self.src)}: refusing member "
                                   f"'{shown(m.name)}' (not a file, directory or link)")
        finally:
            os.close(dfd)


def unpack_channel(out: str, src: str, channel_name: str) -> None:
    try:
        os.mkdir(out, 0o777)
    except FileExistsError:
        pass
    out_fd = fs.open_dir(out)
    try:
        try:
            with tarfile.open(src, "r:*") as tar:
                ex = _Extractor(out_fd, src)
                for m in tar:
                    ex.member(tar, m)
        except (tarfile.TarError, EOFError, OSError) as e:
            if isinstance(e, OSError) and e.errno is not None:
                raise BuiltinError(f"unpacking {shown(src)}: {e.strerror}") from None
            raise BuiltinError(f"unpacking {shown(src)}: {e}") from None
        names = os.listdir(out_fd)
        if len(names) != 1:
            raise BuiltinError(f"channel tarball '{shown(src)}' contains more than one file")
        if posixpath.basename(channel_name) != channel_name or channel_name in ("", ".", ".."):
            raise BuiltinError(f"invalid channel name {shown(channel_name)}")
        os.rename(names[0], channel_name, src_dir_fd=out_fd, dst_dir_fd=out_fd)
    finally:
        os.close(out_fd)


def run(attrs: Attrs) -> None:
    unpack_channel(attrs.get("out"), attrs.get("src"), attrs.get("channelName"))

"""Item 8 of issue 16: an out-of-space, read-only or I/O error names the path at fault.

A write to an fd names nothing, and a name relative to a directory fd (``b'd'``, as
the NAR restorer makes them) names nothing useful: ``naming`` puts the path of the
area being written in its place, and an absolute bytes name is made text (the soak
printed ``No space left on device: 'b'd''`` before).  The real file systems: see
test_full_disk.py (a full tmpfs, read-only remount) and bench/soak.py.
"""

from __future__ import annotations

import errno
import os

import pytest

from storekeeper.daemon.session import error_message
from storekeeper.store.reserve import naming


@pytest.mark.parametrize("raised, shown", [
    (None, "/store/area"),
    (b"d", "/store/area"),                   # relative to some dir fd
    ("x/y", "/store/area"),
    (b"/store/area/tmp-1/x", "/store/area/tmp-1/x"),
    ("/store/area/f", "/store/area/f"),
])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EIO])
def test_naming_names_an_absolute_text_path(raised, shown, code):
    with pytest.raises(OSError) as info:
        with naming("/store/area"):
            raise OSError(code, os.strerror(code), raised) if raised is not None else \
                OSError(code, os.strerror(code))
    assert info.value.errno == code and info.value.filename == shown
    assert error_message(info.value) == f"{os.strerror(code)}: '{shown}'"


def test_other_errors_pass_unchanged():
    with pytest.raises(OSError) as info:
        with naming("/store/area"):
            raise OSError(errno.ENOENT, "No such file or directory", b"d")
    assert info.value.filename == b"d"


def test_the_daemon_message_shows_a_bytes_name_as_text():
    e = OSError(errno.ENOSPC, "No space left on device", b"/s/tmp-1/x")
    assert error_message(e) == "No space left on device: '/s/tmp-1/x'"

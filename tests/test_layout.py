import pytest
from hypothesis import given
from hypothesis import strategies as st

from storekeeper.formats.url import DaemonAddress, LocalLayout, StoreUrlError, parse_store_url

ENV = {"HOME": "/home/u"}


def test_bare_dir_is_a_chroot_root():
    lay = parse_store_url("/tmp/x", ENV)
    assert isinstance(lay, LocalLayout)
    assert lay.store_dir.path == "/nix/store"
    assert lay.real_store_dir == "/tmp/x/nix/store"
    assert lay.state_dir == "/tmp/x/nix/var/nix"
    assert lay.log_dir == "/tmp/x/nix/var/log/nix"
    assert parse_store_url("local?root=/tmp/x", ENV) == lay


def test_custom_store_dir():
    lay = parse_store_url("local?store=/s/store&state=/s/state&log=/s/log", ENV)
    assert lay.store_dir.path == "/s/store" and lay.real_store_dir == "/s/store"
    assert lay.state_dir == "/s/state" and lay.log_dir == "/s/log" and lay.root is None


def test_env_vars_as_nix_honours_them():
    env = {"NIX_STORE_DIR": "/a/store", "NIX_STATE_DIR": "/a/state", "NIX_LOG_DIR": "/a/log"}
    lay = parse_store_url(None, env)
    assert (lay.store_dir.path, lay.state_dir, lay.log_dir) == ("/a/store", "/a/state", "/a/log")
    assert parse_store_url("local", env) == lay
    assert parse_store_url(None, {**env, "NIX_REMOTE": "/r"}).root == "/r"
    assert parse_store_url(None, {"NIX_REMOTE": "daemon", "NIX_STATE_DIR": "/a/state"}) == \
        DaemonAddress("/a/state/daemon-socket/socket")


def test_default_is_embedded_under_data_dir_never_the_real_store():
    lay = parse_store_url(None, ENV)
    assert lay.root == "/home/u/.local/share/storekeeper/root"
    assert lay.real_store_dir != "/nix/store"
    lay = parse_store_url(None, {"HOME": "/h", "XDG_DATA_HOME": "/d"})
    assert lay.root == "/d/storekeeper/root"


def test_slash_is_the_real_store():
    lay = parse_store_url("/", ENV)
    assert lay.real_store_dir == "/nix/store" and lay.state_dir == "/nix/var/nix"


def test_unix_socket_and_errors():
    assert parse_store_url("unix:///run/sk.sock", ENV) == DaemonAddress("/run/sk.sock")
    with pytest.raises(StoreUrlError, match="not supported"):
        parse_store_url("s3://bucket", ENV)
    with pytest.raises(StoreUrlError, match="unknown parameter"):
        parse_store_url("local?bogus=1", ENV)


def test_daemon_addresses_carry_the_client_store_dir():
    assert parse_store_url("unix:///run/sk.sock", ENV).store_dir == "/nix/store"
    assert parse_store_url("unix:///run/sk.sock?store=/s/store&root=/r", ENV) == \
        DaemonAddress("/run/sk.sock", "/s/store")
    env = {"NIX_STORE_DIR": "/e/store", "NIX_STATE_DIR": "/e/state"}
    assert parse_store_url("daemon", env) == DaemonAddress("/e/state/daemon-socket/socket", "/e/store")
    assert parse_store_url("unix://", {**env, "NIX_DAEMON_SOCKET_PATH": "/d.sock"}) == \
        DaemonAddress("/d.sock", "/e/store")
    with pytest.raises(StoreUrlError, match="must be absolute"):
        parse_store_url("unix://relative.sock", ENV)


@given(st.text(alphabet="%&=+aZ09 é€\U0001f600-_/;0123456789abcdefABCDEFgG", max_size=16))
def test_query_decoding_is_urllib_parse(s):
    """formats.url decodes ?query by hand (cold start): exactly as urllib.parse does."""
    import urllib.parse

    from storekeeper.formats.url import parse_qsl, unquote
    assert unquote(s) == urllib.parse.unquote(s)
    assert parse_qsl(s) == urllib.parse.parse_qsl(s, keep_blank_values=True)

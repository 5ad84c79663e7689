"""`kvrelay keys`, loading a key directory, and the loopback-unless-authenticated rule on every command."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from kvrelay import security
from kvrelay.security import keyfiles


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvrelay.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_keys_command_writes_private_files_and_refuses_to_overwrite(tmp_path):
    d = tmp_path / "k"
    r = run("keys", str(d))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for name in keyfiles.FILES:
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name
    k = security.load(d)
    assert len(k.secret) == 32 and len(k.token) >= 32 and len(k.server_public) == 40
    assert k.server_public != k.client_public
    before = (d / "secret").read_text()
    r = run("keys", str(d))
    assert r.returncode == 2 and "--force" in r.stderr and "Traceback" not in r.stderr
    assert (d / "secret").read_text() == before  # untouched
    assert run("keys", str(d), "--force").returncode == 0
    assert (d / "secret").read_text() != before
    # HMAC helpers: parts are length-prefixed, so they cannot be shifted into each other
    assert k.verify(k.sign(b"ab", b"c"), b"ab", b"c") and not k.verify(k.sign(b"ab", b"c"), b"a", b"bc")


def test_load_names_what_is_wrong(tmp_path):
    with pytest.raises(security.KeysError, match="no such directory.*kvrelay keys"):
        security.load(tmp_path / "nope")
    d = security.write_keys(tmp_path / "k")
    os.chmod(d / "secret", 0o644)
    with pytest.raises(security.KeysError, match="secret has mode 0644.*chmod 600"):
        security.load(d)
    os.chmod(d / "secret", 0o600)
    (d / "token").unlink()
    with pytest.raises(security.KeysError, match="missing token"):
        security.load(d)


def test_check_loopback_needs_keys_for_another_address(keys):
    security.check_loopback("127.0.0.1", "store")
    with pytest.raises(ValueError, match="kvrelay keys DIR.*--keys DIR"):
        security.check_loopback("198.18.0.1", "store")
    security.check_loopback("198.18.0.1", "store", keys)
    with security.using(keys):
        security.check_loopback("198.18.0.1", "engine")


@pytest.mark.parametrize("argv", [
    ["store", "--port", "0", "--metrics-port", "-1", "--pool-size", "4MiB"],
    ["engine", "--port", "0", "--num-layers", "1"],
    ["router", "--port", "0", "--decode", "http://127.0.0.1:9"],
], ids=["store", "engine", "router"])
def test_commands_refuse_a_non_loopback_bind_without_keys(argv, tmp_path):
    r = run(*argv, "--host", "198.18.0.1")
    assert r.returncode == 2, r.stderr
    assert "non-loopback" in r.stderr and "kvrelay keys DIR" in r.stderr and "--keys DIR" in r.stderr
    assert "Traceback" not in r.stderr
    # a bad key directory is one line too, not a traceback
    r = run(*argv, "--keys", str(tmp_path / "missing"))
    assert r.returncode == 2 and "no such directory" in r.stderr and "Traceback" not in r.stderr, r.stderr

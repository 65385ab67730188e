"""Admin access rules: token required unless loopback + --insecure-admin; 401 vs 403."""

from __future__ import annotations

from pathlib import Path

import pytest

from jlserve.errors import ServeConfigError
from jlserve.server.auth import AdminAuth
from jlserve.server.config import ServeConfig, read_admin_token
from jlserve.server.errors import AdminHTTPError


def config(tmp_path: Path, **kw) -> ServeConfig:
    return ServeConfig(state_dir=tmp_path / "s", **kw)


def test_no_token_is_refused_unless_insecure_on_loopback(tmp_path):
    with pytest.raises(ServeConfigError, match="admin routes need a token"):
        read_admin_token(config(tmp_path), "127.0.0.1")
    insecure = config(tmp_path, insecure_admin=True)
    with pytest.raises(ServeConfigError, match="only allowed on a loopback host"):
        read_admin_token(insecure, "0.0.0.0")
    # vLLM's default host (None) binds every interface: never loopback
    with pytest.raises(ServeConfigError, match=r"vLLM binds '0\.0\.0\.0'"):
        read_admin_token(insecure, None)
    assert read_admin_token(insecure, "127.0.0.1") is None
    assert read_admin_token(insecure, "::1") is None
    assert read_admin_token(insecure, "localhost") is None
    assert read_admin_token(insecure, None, uds="/tmp/x.sock") is None


def test_token_file_must_hold_one_long_word(tmp_path):
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(ServeConfigError, match="at least 16 characters"):
        read_admin_token(config(tmp_path, admin_token_file=short), "127.0.0.1")
    with pytest.raises(ServeConfigError, match="cannot read admin token"):
        read_admin_token(config(tmp_path, admin_token_file=tmp_path / "missing"), "127.0.0.1")
    good = tmp_path / "good"
    good.write_text("0123456789abcdefXYZ\n")
    assert (
        read_admin_token(config(tmp_path, admin_token_file=good), "0.0.0.0")
        == "0123456789abcdefXYZ"
    )


@pytest.mark.parametrize(
    ("header", "status"),
    [(None, 401), ("Basic abc", 401), ("Bearer ", 401), ("Bearer wrong-token-xxxxxxxxx", 403)],
)
def test_missing_token_is_401_and_wrong_token_403(header, status):
    with pytest.raises(AdminHTTPError) as err:
        AdminAuth("the-right-token-0123456789").check(header)
    assert err.value.status == status
    assert "the-right-token" not in err.value.message


def test_right_token_and_insecure_mode_pass():
    AdminAuth("the-right-token-0123456789").check("Bearer the-right-token-0123456789")
    AdminAuth(None).check(None)


def test_config_round_trips_through_the_environment(tmp_path):
    original = config(tmp_path, insecure_admin=True, watch_dir=tmp_path / "w")
    assert ServeConfig.from_env(original.to_env()) == original
    assert ServeConfig.from_env({}) == ServeConfig()  # plugin mode: every default


def test_plugin_mode_reads_one_variable_per_setting(tmp_path):
    env = {
        "JLSERVE_STATE_DIR": str(tmp_path / "s"),
        "JLSERVE_INSECURE_ADMIN": "1",
        "JLSERVE_DRAIN_TIMEOUT": "2.5",
        "JLSERVE_DRAIN_TIMEOUT_ACTION": "preempt",
    }
    got = ServeConfig.from_env(env)
    assert (got.state_dir, got.insecure_admin, got.drain_timeout_s) == (tmp_path / "s", True, 2.5)
    assert got.drain_timeout_action == "preempt"
    with pytest.raises(ServeConfigError, match="JLSERVE_DRAIN_TIMEOUT"):
        ServeConfig.from_env({"JLSERVE_DRAIN_TIMEOUT": "-1"})


def test_admin_routes_answer_503_until_the_guard_is_configured():
    pending = AdminAuth(configured=False)
    with pytest.raises(AdminHTTPError) as err:
        pending.check("Bearer anything-at-all-0123456")
    assert err.value.status == 503
    pending.configure("the-right-token-0123456789")
    pending.check("Bearer the-right-token-0123456789")

"""Admin access rules: token required unless loopback + --insecure-admin; 401 vs 403."""

from __future__ import annotations

from pathlib import Path

import pytest

from jlserve.errors import ServeConfigError
from jlserve.server.auth import AdminAuth
from jlserve.server.config import ServeConfig, read_admin_token
from jlserve.server.errors import AdminHTTPError


def config(tmp_path: Path, **kw) -> ServeConfig:
    return ServeConfig(model=tmp_path, state_dir=tmp_path / "s", **({"host": "127.0.0.1"} | kw))


def test_no_token_is_refused_unless_insecure_on_loopback(tmp_path):
    with pytest.raises(ServeConfigError, match="admin routes need a token"):
        read_admin_token(config(tmp_path))
    with pytest.raises(ServeConfigError, match="only allowed on a loopback host"):
        read_admin_token(config(tmp_path, host="0.0.0.0", insecure_admin=True))
    assert read_admin_token(config(tmp_path, insecure_admin=True)) is None
    assert read_admin_token(config(tmp_path, host="::1", insecure_admin=True)) is None


def test_token_file_must_hold_one_long_word(tmp_path):
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(ServeConfigError, match="at least 16 characters"):
        read_admin_token(config(tmp_path, admin_token_file=short))
    with pytest.raises(ServeConfigError, match="cannot read admin token"):
        read_admin_token(config(tmp_path, admin_token_file=tmp_path / "missing"))
    good = tmp_path / "good"
    good.write_text("0123456789abcdefXYZ\n")
    assert (
        read_admin_token(config(tmp_path, admin_token_file=good, host="0.0.0.0"))
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
    with pytest.raises(ServeConfigError, match="jlserve serve"):
        ServeConfig.from_env({})

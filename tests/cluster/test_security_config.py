"""The security knobs: what they refuse, how the token is read, and that the YAML keys and
flags reach them."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.cluster.cli import build_parser, serve_config
from pdserve.cluster.config import ServeConfig
from pdserve.cluster.security_config import TOKEN_ENV, SecurityConfig
from pdserve.engine.weights import load_model_config
from pdserve.router.security import TokenCheck


def _file(tmp_path: Path, name: str, text: str = "x") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_tls_files_go_together_and_must_be_readable(tmp_path: Path) -> None:
    cert, key = _file(tmp_path, "c.pem"), _file(tmp_path, "k.pem")
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        SecurityConfig(tls_cert=cert)
    with pytest.raises(ValueError, match=r"tls_client_ca .* needs tls_cert"):
        SecurityConfig(tls_client_ca=cert)
    with pytest.raises(ValueError, match="tls_key: cannot read"):
        SecurityConfig(tls_cert=cert, tls_key=str(tmp_path / "missing.pem"))
    tls = SecurityConfig(tls_cert=cert, tls_key=key).tls()
    assert tls is not None and tls.cert == cert and tls.client_ca == ""
    assert SecurityConfig().tls() is None


def test_token_from_file_else_environment(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"auth_token_file: .* is empty"):
        SecurityConfig(auth_token_file=_file(tmp_path, "empty", "\n"))
    cfg = SecurityConfig(auth_token_file=_file(tmp_path, "t", "file-token\n"))
    check = cfg.token_check({TOKEN_ENV: "env-token"})
    assert check == TokenCheck.for_token("file-token")  # the file wins
    assert SecurityConfig().token_check({TOKEN_ENV: " env-token "}) == \
        TokenCheck.for_token("env-token")
    assert SecurityConfig().token_check({}) is None
    assert "file-token" not in repr(check)


def test_token_check_refusals() -> None:
    check = TokenCheck.for_token("s3cret")
    assert check.refusal("Bearer s3cret") is None
    assert check.refusal("bearer s3cret") is None  # the scheme is case-insensitive
    missing = check.refusal(None)
    assert missing is not None and "authorization" in missing
    assert check.refusal("Basic czNjcmV0") == \
        "the 'authorization' metadata must read 'Bearer <token>'"
    assert check.refusal("Bearer s3cret2") == "invalid bearer token"
    assert check.refusal("Bearer ") == "invalid bearer token"
    with pytest.raises(ValueError):
        TokenCheck.for_token("")


def test_yaml_keys_and_flags_reach_the_security_section(tmp_path: Path) -> None:
    token = _file(tmp_path, "t", "abc")
    cfg = ServeConfig.from_dict({"auth_token_file": token, "min_decode": 2})
    assert cfg.security.auth_token_file == token and cfg.autoscaling.min_decode == 2
    cert, key = _file(tmp_path, "c.pem"), _file(tmp_path, "k.pem")
    args = build_parser().parse_args(["serve", "--tls-cert", cert, "--tls-key", key])
    flagged = serve_config(args)
    assert (flagged.security.tls_cert, flagged.security.tls_key) == (cert, key)
    server = flagged.server_config(load_model_config(flagged.model))
    assert server.tls is not None and server.auth is None

"""SecurityConfig: TLS and the bearer token of the gRPC and HTTP APIs, each knob defined once (flags
of `pdserve serve` and keys of its YAML, like ``ServeConfig``'s own).

The files are checked here, on the driver's node, where the frontends run
(``cluster.launch.start_router`` pins them there): a missing or unreadable file fails
``pdserve serve`` at once, naming the knob. The token itself stays on the driver; the
frontends get its digest (``router.security.TokenCheck``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pdserve.cluster.knobs import check_values, knob
from pdserve.router.security import TlsFiles, TokenCheck

TOKEN_ENV = "PDSERVE_AUTH_TOKEN"  # the token, where no --auth-token-file is given
SECURITY = "security"
SECURITY_GROUP = {SECURITY: "who may call the gRPC and HTTP APIs (the KV channels, the rendezvous "
                            "and the router's feed always authenticate with a secret of "
                            "the deployment's own)"}


@dataclass(frozen=True)
class SecurityConfig:
    tls_cert: str = knob("", "PEM certificate chain: the frontends serve TLS with it, on "
                         "the gRPC and the HTTP port (with --tls-key)", SECURITY,
                         metavar="FILE")
    tls_key: str = knob("", "PEM private key of --tls-cert", SECURITY, metavar="FILE")
    tls_client_ca: str = knob("", "PEM CA bundle: every client must present a certificate "
                              "it signed (mutual TLS; needs --tls-cert)", SECURITY,
                              metavar="FILE")
    auth_token_file: str = knob(
        "", "file holding the bearer token every call but health checks must send "
        "('authorization: Bearer <token>', else UNAUTHENTICATED, HTTP 401); empty: the "
        f"{TOKEN_ENV} environment variable if set, else no token", SECURITY, metavar="FILE")

    def __post_init__(self) -> None:
        check_values(self)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file"):
            path = getattr(self, name)
            if path:
                try:
                    Path(path).read_bytes()
                except OSError as e:
                    raise ValueError(f"{name}: cannot read {path}: {e.strerror}") from None
        if self.auth_token_file and not self._file_token():
            raise ValueError(f"auth_token_file: {self.auth_token_file} is empty")

    def tls(self) -> TlsFiles | None:
        """The frontends' TLS files, or None (plaintext)."""
        if not self.tls_cert:
            return None
        absolute = [str(Path(p).resolve()) if p else ""
                    for p in (self.tls_cert, self.tls_key, self.tls_client_ca)]
        return TlsFiles(*absolute)

    def token_check(self, environ: Mapping[str, str] = os.environ) -> TokenCheck | None:
        """The token calls must carry (the file's, else ``TOKEN_ENV``'s), or None."""
        token = self._file_token() if self.auth_token_file else environ.get(TOKEN_ENV, "")
        return TokenCheck.for_token(token.strip()) if token.strip() else None

    def _file_token(self) -> str:
        return Path(self.auth_token_file).read_text().strip()

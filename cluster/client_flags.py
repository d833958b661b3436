"""The flags of the client commands (`pdserve generate`, `info`, `bench`) that say how to
reach a server started with TLS, mutual TLS or a bearer token (``cluster.security_config``)."""

from __future__ import annotations

import argparse

from pdserve.proto.credentials import TOKEN_ENV, ClientAuth


def add_client_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection", "how to reach a server that asks for TLS or a token")
    g.add_argument("--tls", action="store_true",
                   help="connect with TLS, trusting the system's CAs (implied by the flags below)")
    g.add_argument("--tls-ca", default="", metavar="FILE",
                   help="PEM CA bundle to trust for the server's certificate")
    g.add_argument("--tls-cert", default="", metavar="FILE",
                   help="PEM client certificate (a server with --tls-client-ca asks for one)")
    g.add_argument("--tls-key", default="", metavar="FILE", help="PEM key of --tls-cert")
    g.add_argument("--tls-server-name", default="", metavar="NAME",
                   help="the name the server's certificate must carry, where it is not the "
                        "host of --server")
    g.add_argument("--auth-token-file", default="", metavar="FILE",
                   help=f"file holding the bearer token to send (default: ${TOKEN_ENV})")


def client_auth(args: argparse.Namespace) -> ClientAuth | None:
    """What the connection flags ask for (ValueError for a half-given client certificate,
    OSError for an unreadable token file)."""
    return ClientAuth.from_files(tls=args.tls, ca=args.tls_ca, cert=args.tls_cert,
                                 key=args.tls_key, token_file=args.auth_token_file,
                                 server_name=args.tls_server_name)

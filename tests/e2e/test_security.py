"""A deployment that serves mutual TLS and asks for a bearer token: who gets in, who does
not, and with which status."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import openai
import pytest

from pdserve.cluster.launch import Deployment, launch
from pdserve.cluster.security_config import SecurityConfig
from pdserve.proto.client import AsyncClient, Client, acollect, collect
from pdserve.proto.credentials import ClientAuth
from pdserve_testing.certs import Pki, make_pki
from pdserve_testing.e2e import HFReference, failure_counts, serve_config, wait_for
from pdserve_testing.nodes import free_port

pytestmark = pytest.mark.e2e

TOKEN = "pdserve-test-token-7f3a"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secured(ray_cluster: None, default_gguf: Path, pki: Pki,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(TOKEN + "\n")
    security = SecurityConfig(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                              tls_client_ca=str(pki.ca), auth_token_file=str(token_file))
    cfg = replace(serve_config(default_gguf, "e2e-security", mode="colocated",
                               http_port=free_port()),
                  security=security)
    dep = launch(cfg)
    yield dep
    dep.stop()


def _auth(pki: Pki, **over: object) -> ClientAuth:
    base: dict[str, object] = dict(ca=str(pki.ca), cert=str(pki.client_cert),
                                   key=str(pki.client_key), token=TOKEN)
    base.update(over)
    return ClientAuth(**base)  # type: ignore[arg-type]


def _code(dep: Deployment, auth: ClientAuth | None) -> tuple[grpc.StatusCode, str]:
    with Client(dep.address, auth=auth, own_connection=True) as client, \
            pytest.raises(grpc.RpcError) as e:
        collect(client.generate(text=PROMPT, max_tokens=4, timeout=20))
    return e.value.code(), e.value.details() or ""


def test_a_client_with_certificate_and_token_is_served(
    secured: Deployment, pki: Pki, hf_reference: HFReference
) -> None:
    ids = hf_reference.tokenizer(PROMPT)["input_ids"]
    with Client(secured.address, auth=_auth(pki)) as client:
        out = collect(client.generate(token_ids=ids, max_tokens=8, temperature=0.0,
                                      timeout=60))
        assert out.token_ids == hf_reference.greedy(ids, 8)
        assert client.server_info(timeout=10).num_decode_workers == 1

    async def aio() -> list[int]:
        async with AsyncClient(secured.address, auth=_auth(pki)) as c:
            done = await acollect(c.generate(token_ids=ids, max_tokens=8, temperature=0.0,
                                             timeout=60))
            return done.token_ids
    assert asyncio.run(aio()) == hf_reference.greedy(ids, 8)  # the aio client's credentials


def test_calls_without_the_token_are_unauthenticated_and_counted(
    secured: Deployment, pki: Pki
) -> None:
    before = failure_counts(secured).get("UNAUTHENTICATED", 0.0)
    code, details = _code(secured, _auth(pki, token=""))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization" in details
    code, details = _code(secured, _auth(pki, token="not-the-token"))
    assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")
    with Client(secured.address, auth=_auth(pki, token="")) as client:
        with pytest.raises(grpc.RpcError) as e:
            client.server_info(timeout=10)  # unary calls too
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert client.health(timeout=10) == "SERVING"  # probes need no token
    wait_for(lambda: failure_counts(secured).get("UNAUTHENTICATED", 0.0) == before + 3,
             what="three UNAUTHENTICATED failures counted")


def test_tls_is_required_and_client_certificates_are_checked(
    secured: Deployment, pki: Pki
) -> None:
    code, _ = _code(secured, ClientAuth(tls=False, token=TOKEN))  # plaintext
    assert code == grpc.StatusCode.UNAVAILABLE
    code, _ = _code(secured, _auth(pki, cert="", key=""))  # no client certificate
    assert code == grpc.StatusCode.UNAVAILABLE
    code, _ = _code(secured, _auth(pki, cert=str(pki.rogue_cert), key=str(pki.rogue_key)))
    assert code == grpc.StatusCode.UNAVAILABLE  # a certificate of another CA
    code, _ = _code(secured, _auth(pki, ca=str(pki.rogue_ca)))  # the server is not trusted
    assert code == grpc.StatusCode.UNAVAILABLE


def _https(dep: Deployment, ca: Path, cert: Path | None, key: Path | None,
           token: str = TOKEN) -> openai.OpenAI:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return openai.OpenAI(base_url=f"https://127.0.0.1:{dep.cfg.http_port}/v1", api_key=token,
                         max_retries=0, timeout=60,
                         http_client=openai.DefaultHttpxClient(verify=ctx))


def test_the_http_api_serves_mutual_tls_and_asks_for_the_token(
    secured: Deployment, pki: Pki, hf_reference: HFReference
) -> None:
    ids = hf_reference.tokenizer(PROMPT)["input_ids"]
    want = hf_reference.tokenizer.decode(hf_reference.greedy(ids, 8), skip_special_tokens=True)
    with _https(secured, pki.ca, pki.client_cert, pki.client_key) as c:
        model = c.models.list().data[0].id
        out = c.completions.create(model=model, prompt=ids, max_tokens=8, temperature=0)
        assert out.choices[0].text == want
    with _https(secured, pki.ca, pki.client_cert, pki.client_key, token="not-it") as c, \
            pytest.raises(openai.AuthenticationError):
        c.models.list()
    for ca, cert, key in ((pki.ca, None, None),  # no client certificate
                          (pki.ca, pki.rogue_cert, pki.rogue_key),  # one of another CA
                          (pki.rogue_ca, pki.client_cert, pki.client_key)):  # server untrusted
        with _https(secured, ca, cert, key) as c, pytest.raises(openai.APIConnectionError):
            c.models.list()
    with openai.OpenAI(base_url=f"http://127.0.0.1:{secured.cfg.http_port}/v1", api_key=TOKEN,
                       max_retries=0, timeout=10) as plain, \
            pytest.raises(openai.APIConnectionError):  # plaintext to the TLS port
        plain.models.list()

"""Security promises: loopback by default, the API key guards every route but health, is compared in
constant time and never logged; the client never writes it into checkpoints, results or logs."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from server_stub.__main__ import parse_args
from server_stub.app import ServerOptions
from tests.reliability.helpers import cli, tune_args

KEY = "sk-reliability-7f3a9c1e5b"
WRONG = "sk-reliability-0000000000"


def _routes():
    return [("GET", "/v1/model", None), ("POST", "/v1/tokenize", {"words": ["great"]}),
            ("POST", "/v1/score", {"template": "{text} It was {mask} .", "texts": ["ok"],
                                   "label_words": ["bad", "great"], "prompt": {"kind": "none"}})]


@pytest.fixture(scope="module")
def keyed_server(tiny_bert_dir, tmp_path_factory):
    from tests.reliability.helpers import ServerProcess

    log = tmp_path_factory.mktemp("keyed") / "server.log"
    sp = ServerProcess(tiny_bert_dir, "--api-key-env", "RELIABILITY_KEY", "--log-level", "DEBUG",
                       env={"RELIABILITY_KEY": KEY}, log_path=log)
    sp.start()
    sp.log = log  # type: ignore[attr-defined]
    yield sp
    sp.stop()


def test_server_binds_loopback_by_default():
    assert ServerOptions().host == "127.0.0.1"
    assert parse_args([]).host == "127.0.0.1"


def test_default_server_is_not_reachable_on_other_interfaces(keyed_server):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: just picks the outward interface
            ip = s.getsockname()[0]
        except OSError:
            ip = "127.0.0.1"
    if ip.startswith("127."):
        pytest.skip("this machine has no non-loopback IPv4 address")
    with pytest.raises(OSError):
        socket.create_connection((ip, keyed_server.port), timeout=2).close()
    socket.create_connection(("127.0.0.1", keyed_server.port), timeout=2).close()


@pytest.mark.parametrize("auth", [None, f"Bearer {WRONG}", f"Bearer {KEY[:-1]}", f"Bearer {KEY}x", f"Basic {KEY}",
                                  KEY, "Bearer", f"bearer  {WRONG}"])
def test_every_route_but_health_needs_the_key(keyed_server, auth):
    headers = {"Authorization": auth} if auth else {}
    with httpx.Client(base_url=keyed_server.url, timeout=30) as c:
        assert c.get("/v1/health", headers=headers).status_code == 200
        for method, path, body in _routes():
            r = c.request(method, path, json=body, headers=headers)
            assert r.status_code == 401, (path, auth)
            assert r.headers["WWW-Authenticate"] == "Bearer" and KEY not in r.text
            # Auth is checked before the body is parsed: garbage gets 401 too, not a parse error.
            if method == "POST":
                assert c.post(path, content=b"\xff{", headers=headers).status_code == 401
        ok = {"Authorization": f"Bearer {KEY}"}
        for method, path, body in _routes():
            assert c.request(method, path, json=body, headers=ok).status_code == 200


def test_key_is_compared_in_constant_time(tiny_bert_dir, monkeypatch):
    """The comparison goes through hmac.compare_digest (timing-safe) on every authenticated request."""
    import hmac

    from server_stub.http import framing as server_http
    from server_stub.testing import run_server

    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(server_http.hmac, "compare_digest", spy)
    with run_server(tiny_bert_dir, api_key=KEY, threads=1) as url, httpx.Client(base_url=url) as c:
        assert c.get("/v1/model", headers={"Authorization": f"Bearer {WRONG}"}).status_code == 401
        assert c.get("/v1/model", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert c.get("/v1/model", headers={"Authorization": "Bearer short"}).status_code == 401
    assert len(calls) == 3


def test_client_never_writes_the_key_to_checkpoints_results_or_logs(keyed_server, tmp_path):
    run = tmp_path / "run"
    r = cli("-v", *tune_args(keyed_server.url, run, calls=24), env={"BBT_API_KEY": KEY})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["api_calls_used"] > 0
    assert KEY not in r.stdout and KEY not in r.stderr
    files = [p for p in run.rglob("*") if p.is_file()]
    assert {"checkpoint.pkl", "result.json", "config.json"} <= {p.name for p in files}
    for p in files:
        assert KEY.encode() not in p.read_bytes(), p
    # A wrong key fails fast with a clear message that does not echo it either.
    bad = cli(*tune_args(keyed_server.url, tmp_path / "bad", calls=24), env={"BBT_API_KEY": WRONG})
    assert bad.returncode == 3 and "API key" in bad.stderr and WRONG not in bad.stderr + bad.stdout
    # ... and the server, logging at DEBUG, wrote neither key anywhere.
    text = keyed_server.log.read_text()
    assert "/v1/score" in text and KEY not in text and WRONG not in text

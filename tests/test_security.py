"""API keys, the Host header check, and the exposure warning."""

from __future__ import annotations

import logging

import httpx
import pytest
from serving import live_server

from parallama.server.serve import warn_if_exposed
from parallama.server.settings import Settings

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "key.txt"
    key_file.write_text("s3cret-key\n")
    with live_server(parallel=2, ctx_size=256, api_key_file=key_file, allowed_hosts="parallama.internal") as srv:
        yield srv


def test_every_v1_route_and_status_need_the_key(keyed):
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    calls = [("GET", "/v1/models", None), ("GET", "/status", None), ("POST", "/v1/chat/completions", chat),
             ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2})]
    for method, path, body in calls:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"}):
            response = httpx.request(method, keyed.base_url + path, json=body, headers=headers, timeout=30)
            assert response.status_code == 401, (path, headers)
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert response.json()["error"]["type"] == "invalid_request_error"
        good = httpx.request(method, keyed.base_url + path, json=body, timeout=60,
                             headers={"Authorization": "Bearer s3cret-key"})
        assert good.status_code == 200, (path, good.text)


def test_health_stays_open(keyed):
    assert httpx.get(keyed.base_url + "/health").status_code == 200


def test_openai_client_with_the_key(keyed):
    import openai

    client = openai.OpenAI(base_url=keyed.base_url + "/v1", api_key="s3cret-key", max_retries=0)
    assert client.models.list().data[0].id
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.base_url + "/v1", api_key="nope", max_retries=0).models.list()


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "192.168.1.5", "localhost.evil.example"])
def test_foreign_host_headers_are_refused_on_loopback(keyed, host):
    response = httpx.get(keyed.base_url + "/health", headers={"Host": host})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "host_not_allowed"


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1:1234", "[::1]:8000", "parallama.internal"])
def test_loopback_and_allowed_hosts_pass(keyed, host):
    assert httpx.get(keyed.base_url + "/health", headers={"Host": host}).status_code == 200


def test_exposed_bind_without_key_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="parallama"):
        warn_if_exposed(Settings(host="0.0.0.0"))
    assert "no API key" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="parallama"):
        warn_if_exposed(Settings(host="0.0.0.0", api_key="k"))
        warn_if_exposed(Settings(host="127.0.0.1"))
    assert caplog.text == ""

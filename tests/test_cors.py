"""CORS for --cors-origins, and the web page's files being open while the API needs the key. No model:
the app's build fails on purpose, so every API route answers 503 model_loading behind the Guard."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route

from parallama.server.app import create_app
from parallama.server.cli import build_parser
from parallama.server.cors import Cors
from parallama.server.settings import Settings

ALLOWED = "http://tools.example:3000"
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def _no_model(settings):
    raise RuntimeError("no model needed")


@pytest.fixture(params=[None, "k3y"], ids=["no-key", "key"])
def client(request):
    app = create_app(Settings(cors_origins=f"{ALLOWED}, https://other.example/", api_key=request.param), _no_model)
    with TestClient(app, base_url="http://127.0.0.1") as test_client:  # a loopback Host, as a local client sends
        test_client.key = request.param
        yield test_client


def _auth(client) -> dict:
    return {"Authorization": f"Bearer {client.key}"} if client.key else {}


def test_preflight_from_an_allowed_origin_is_answered_before_the_key(client):
    # No key: a browser's preflight never carries one.
    response = client.options("/v1/chat/completions", headers={"Origin": ALLOWED, **PREFLIGHT})
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in response.headers["access-control-allow-methods"]
    allowed_headers = response.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed_headers and "content-type" in allowed_headers
    assert "origin" in response.headers["vary"].lower()


def test_a_trailing_slash_in_the_setting_still_matches(client):
    response = client.options("/status", headers={"Origin": "https://other.example", **PREFLIGHT})
    assert response.headers["access-control-allow-origin"] == "https://other.example"


def test_preflight_from_another_origin_is_refused_without_cors_headers(client):
    response = client.options("/v1/chat/completions", headers={"Origin": "http://evil.example", **PREFLIGHT})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in response.headers


def test_real_requests_from_an_allowed_origin_carry_the_header_and_still_need_the_key(client):
    response = client.post("/v1/chat/completions", json=CHAT, headers={"Origin": ALLOWED, **_auth(client)})
    assert response.status_code == 503  # past the Guard; the model is (deliberately) not there
    assert response.headers["access-control-allow-origin"] == ALLOWED
    assert "retry-after" in response.headers["access-control-expose-headers"].lower()
    if client.key:
        refused = client.post("/v1/chat/completions", json=CHAT, headers={"Origin": ALLOWED})
        assert refused.status_code == 401
        assert refused.headers["access-control-allow-origin"] == ALLOWED  # so the page can read the 401


def test_requests_from_another_origin_get_no_cors_headers(client):
    response = client.get("/status", headers={"Origin": "http://evil.example", **_auth(client)})
    assert response.status_code == 503
    assert "access-control-allow-origin" not in response.headers
    same_origin = client.get("/status", headers=_auth(client))  # the page on the server itself: no Origin dance
    assert "access-control-allow-origin" not in same_origin.headers


def test_without_cors_origins_nothing_is_allowed():
    app = create_app(Settings(), _no_model)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        preflight = client.options("/v1/models", headers={"Origin": ALLOWED, **PREFLIGHT})
        assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers
        assert "access-control-allow-origin" not in client.get("/health", headers={"Origin": ALLOWED}).headers


def test_a_wildcard_allows_any_origin():
    app = create_app(Settings(cors_origins="*"), _no_model)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        response = client.options("/v1/models", headers={"Origin": "http://anything.example", **PREFLIGHT})
        assert response.status_code == 204
        assert response.headers["access-control-allow-origin"] == "http://anything.example"


def test_streamed_responses_carry_the_header():
    async def stream(request):
        async def chunks():
            for i in range(3):
                yield f"data: {i}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    app = Cors(Starlette(routes=[Route("/s", stream)]), origins=[ALLOWED])
    with TestClient(app) as client, client.stream("GET", "/s", headers={"Origin": ALLOWED}) as response:
        assert response.headers["access-control-allow-origin"] == ALLOWED
        assert "".join(response.iter_text()).endswith("data: [DONE]\n\n")


def test_the_setting_from_flag_and_environment(monkeypatch):
    args = build_parser().parse_args(["serve", "--cors-origins", "http://a.example:3000, HTTPS://B.example/"])
    given = {k: v for k, v in vars(args).items() if k != "command"}
    assert Settings(**given).cors_origins == ["http://a.example:3000", "https://b.example"]
    monkeypatch.setenv("PARALLAMA_CORS_ORIGINS", "http://c.example")
    assert Settings().cors_origins == ["http://c.example"]
    monkeypatch.delenv("PARALLAMA_CORS_ORIGINS")
    assert Settings().cors_origins == []


# --- the page itself ----------------------------------------------------------------------------------
def test_the_page_and_its_files_load_without_the_key_but_the_api_does_not():
    app = create_app(Settings(api_key="k3y"), _no_model)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]  # no inline or remote script
        assert 'src="/web/chat.js"' in page.text
        for asset in ("/web/chat.js", "/web/markdown.js", "/web/live.js", "/web/style.css", "/web/icon.svg"):
            assert client.get(asset).status_code == 200, asset
        assert client.get("/web/missing.js").status_code == 404
        for path in ("/status", "/v1/models", "/web/../status", "/web/%2e%2e/status"):
            assert client.get(path).status_code in (401, 404), path  # never the API without the key
        assert client.get("/status").status_code == 401


def test_the_page_has_no_remote_references():
    """It must work offline: it loads only its own files, and its scripts call only this server."""
    import re

    from parallama.server.app import WEB

    html = (WEB / "index.html").read_text()
    assert all(url.startswith("/web/") for url in re.findall(r'(?:src|href)="([^"]*)"', html))
    css = (WEB / "style.css").read_text()
    assert "url(" not in css and "@import" not in css
    for script in WEB.glob("*.js"):
        assert all(url.startswith("/") for url in re.findall(r'fetch\(\s*"([^"]*)"', script.read_text())), script

"""HTTP conventions of the server that load balancers, uptime probes and browsers rely on (RFC 9110):
HEAD on every GET route, ``Allow`` on every 405, ``OPTIONS`` answered with the allowed methods, and
CORS for the origins configured (none by default)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from serve_helpers import make_app, serving, tiny_lm, tokenizer  # noqa: E402

from switchformer.serve.app import create_app  # noqa: E402

pytestmark = pytest.mark.timeout(120)

GET_ROUTES = ["/health", "/v1/models", "/v1/models/tiny", "/metrics", "/"]
POST_ROUTES = ["/v1/completions", "/v1/chat/completions"]


@pytest.fixture(scope="module")
def parts():
    return tiny_lm(), tokenizer()


@pytest.fixture(scope="module")
def server(parts):
    app, _ = make_app(*parts)
    with serving(app) as url:
        yield url


def _app_routes(app) -> dict[str, set[str]]:
    return {route.path: set(route.methods) for route in app.router.routes if getattr(route, "methods", None)}


def test_every_get_route_answers_head_with_gets_headers_and_no_body(server, parts):
    app, _ = make_app(*parts)
    routes = _app_routes(app)
    assert {path for path, methods in routes.items() if "GET" in methods} == {"/health", "/v1/models",
                                                                             "/v1/models/{name}", "/metrics", "/"}
    for path in GET_ROUTES:
        get, head = httpx.get(server + path, timeout=10), httpx.head(server + path, timeout=10)
        assert get.status_code == head.status_code == 200, path
        assert head.content == b"", path
        assert head.headers["content-type"] == get.headers["content-type"], path
        if path != "/metrics":  # its counters move between the two requests
            assert head.headers["content-length"] == get.headers["content-length"], path


@pytest.mark.parametrize("method, path, allowed", [
    ("GET", "/v1/completions", "OPTIONS, POST"), ("PUT", "/v1/chat/completions", "OPTIONS, POST"),
    ("POST", "/health", "GET, HEAD, OPTIONS"), ("DELETE", "/v1/models", "GET, HEAD, OPTIONS"),
])  # fmt: skip
def test_a_405_names_the_allowed_methods(server, method, path, allowed):
    response = httpx.request(method, server + path, timeout=10)
    assert response.status_code == 405
    assert response.headers["allow"] == allowed  # what OPTIONS answers too
    assert response.json()["error"]["message"].startswith(f"{method} {path}:")


def test_options_names_the_methods_of_every_route(server, parts):
    app, _ = make_app(*parts)
    for path, methods in _app_routes(app).items():
        concrete = path.replace("{name}", "tiny")
        response = httpx.options(server + concrete, timeout=10)
        assert response.status_code == 204, path
        assert set(response.headers["allow"].split(", ")) == methods | {"OPTIONS"}, path
    assert httpx.options(server + "/nowhere", timeout=10).status_code == 404
    # no origin is allowed unless configured: a preflight gets no CORS approval
    preflight = httpx.options(server + "/v1/completions", timeout=10,
                              headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_for_the_configured_origins_only(parts):
    from switchformer.serve.engine import Engine
    from switchformer.serve.prompts import PromptFormatter
    from switchformer.serve.protocol import Limits

    model, tok = parts
    engine = Engine(model, tok, max_request_tokens=128)
    app = create_app(engine, PromptFormatter(tok, model), model_name="tiny", limits=Limits(100, 100, 128),
                     api_key="secret", cors_origins=["https://app.example.com"])  # fmt: skip
    with serving(app) as url:
        ask = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip
        preflight = httpx.options(url + "/v1/chat/completions", headers=ask, timeout=10)
        assert preflight.status_code == 200  # before authorization: browsers send no key with a preflight
        assert preflight.headers["access-control-allow-origin"] == "https://app.example.com"
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        denied = httpx.options(url + "/v1/chat/completions", headers={**ask, "Origin": "https://evil.example"},
                               timeout=10)  # fmt: skip
        assert denied.status_code == 400 and "access-control-allow-origin" not in denied.headers
        body = {"prompt": "the cat", "max_tokens": 2}
        answer = httpx.post(url + "/v1/completions", json=body, timeout=30,
                            headers={"Origin": "https://app.example.com", "Authorization": "Bearer secret"})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "https://app.example.com"
        refused = httpx.post(url + "/v1/completions", json=body, timeout=30, headers={"Origin": "https://app.example.com"})
        assert refused.status_code == 401  # CORS does not lift the API key

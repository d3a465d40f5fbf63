"""The Unified CM node's HTTP roles, as aiohttp applications the UCM component mounts.

`build_ucm_http_apps` returns two applications:

* the HTTPS app for port 8443: UDS under ``/cucm-uds/`` and the OAuth authorization server
  under ``/ssp/oauth/`` (``POST token``, ``GET keys``);
* the TFTP app, served both as plain HTTP on 6970 and HTTPS on 6972 (one ``AppRunner`` with two
  ``TCPSite``s).

Each app keeps a `RequestStats` at ``app[STATS_KEY]`` for the component's ``status()``.
"""

from __future__ import annotations

import json

from aiohttp import web
from prometheus_client import CollectorRegistry

from edge.config import LabConfig, UcmNode
from mock_ucm.directory import Directory
from mock_ucm.http_common import Authenticator, HttpMetrics, RequestStats, new_app
from mock_ucm.oauth import OAuthIssuer, TokenError
from mock_ucm.tftp import TftpFiles, TftpHandlers
from mock_ucm.uds import UdsHandlers

MAX_FORM_FIELD_CHARS = 8192
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 §5.1


def _oauth_error(error: str, description: str, status: int = 400) -> web.HTTPException:
    """RFC 6749 §5.2 error response."""
    cls: type[web.HTTPException] = web.HTTPUnauthorized if status == 401 else web.HTTPBadRequest
    return cls(
        text=json.dumps({"error": error, "error_description": description}),
        content_type="application/json",
        headers=_NO_STORE,
    )


class OAuthHandlers:
    """``/ssp/oauth/token`` (password and refresh_token grants) and ``/ssp/oauth/keys`` (JWKS)."""

    def __init__(self, directory: Directory, oauth: OAuthIssuer) -> None:
        self.directory = directory
        self.oauth = oauth

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/ssp/oauth/token", self._handle_token)
        app.router.add_get("/ssp/oauth/keys", self._handle_keys)

    async def _handle_keys(self, request: web.Request) -> web.Response:
        return web.json_response(self.oauth.jwks(), headers={"Cache-Control": "max-age=300"})

    async def _handle_token(self, request: web.Request) -> web.Response:
        if request.content_type != "application/x-www-form-urlencoded":
            raise _oauth_error("invalid_request", "body must be application/x-www-form-urlencoded")
        form = await request.post()  # bounded by the app's client_max_size (413 beyond)
        fields: dict[str, str] = {}
        for key in ("grant_type", "username", "password", "refresh_token", "client_id"):
            value = form.get(key)
            if value is None:
                continue
            if not isinstance(value, str) or len(value) > MAX_FORM_FIELD_CHARS:
                raise _oauth_error("invalid_request", f"bad {key}")
            fields[key] = value
        grant_type = fields.get("grant_type")
        if grant_type == "password":
            return self._password_grant(fields)
        if grant_type == "refresh_token":
            return self._refresh_grant(fields)
        if grant_type is None:
            raise _oauth_error("invalid_request", "grant_type is required")
        raise _oauth_error("unsupported_grant_type", "supported: password, refresh_token")

    def _password_grant(self, fields: dict[str, str]) -> web.Response:
        username, password = fields.get("username"), fields.get("password")
        if not username or password is None:
            raise _oauth_error("invalid_request", "username and password are required")
        if not self.directory.authenticate(username, password):
            raise _oauth_error("invalid_grant", "bad username or password")
        user = self.directory.get_user(username)
        assert user is not None  # authenticate() succeeded
        grant = self.oauth.issue(user.username, client_id=fields.get("client_id"))
        return web.json_response(grant.as_json(), headers=_NO_STORE)

    def _refresh_grant(self, fields: dict[str, str]) -> web.Response:
        token = fields.get("refresh_token")
        if not token:
            raise _oauth_error("invalid_request", "refresh_token is required")
        try:
            grant = self.oauth.refresh(token, user_exists=lambda u: self.directory.get_user(u) is not None)
        except TokenError as exc:
            raise _oauth_error(exc.error, exc.description) from None
        return web.json_response(grant.as_json(), headers=_NO_STORE)


def build_ucm_http_apps(
    config: LabConfig,
    node: UcmNode,
    directory: Directory,
    oauth: OAuthIssuer,
    *,
    registry: CollectorRegistry | None = None,
) -> tuple[web.Application, web.Application]:
    """(https_app for 8443, tftp_app for 6970 and 6972) of one Unified CM node.

    With a `registry`, requests are also counted in the Prometheus counter
    ``ucm_http_requests_total{app, route, status}``.
    """
    metrics = HttpMetrics(registry, "ucm") if registry is not None else None
    https_app = new_app(RequestStats("https", metrics))
    UdsHandlers(config, node, directory, Authenticator(directory, oauth)).add_routes(https_app)
    OAuthHandlers(directory, oauth).add_routes(https_app)
    tftp_app = new_app(RequestStats("tftp", metrics))
    TftpHandlers(TftpFiles(config, node, directory)).add_routes(tftp_app)
    return https_app, tftp_app

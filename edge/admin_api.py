"""The admin REST API of the Expressways (`/api/v1`, shared/spec/MRA.md §8), with its OpenAPI document.

One small table-driven router per component: each `Operation` names its method, path template,
handler, request body and documented answers; the same table serves the requests and builds the
OpenAPI 3.0 document at ``/api/v1/openapi.json``, so the two cannot drift apart.

Every answer is JSON. Bad input is a 4xx naming the field and the reason (``{"status", "field",
"reason", "errors"}``), never a traceback. Every operation needs HTTP Basic with the lab's admin
credentials (``lab.admin_username`` / ``lab.admin_password``), never a lab user's.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    from edge.runtime import BaseComponent
    from edge_c.allowlist import Entry
    from edge_c.component import ExpresswayC
    from edge_e.component import ExpresswayE

log = logging.getLogger(__name__)

PREFIX = "/api/v1"
REALM = "edge-admin"
MAX_TEXT = 1024


class ApiError(Exception):
    """An answer other than success: status, the field at fault ("" for none) and why."""

    def __init__(
        self, status: int, field: str, reason: str, errors: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(f"{status} {field}: {reason}")
        self.status = status
        self.field = field
        self.reason = reason
        self.errors = errors or [{"field": field, "reason": reason}]

    def response(self) -> web.Response:
        body = {"status": self.status, "field": self.field, "reason": self.reason, "errors": self.errors}
        headers = {"WWW-Authenticate": f'Basic realm="{REALM}"'} if self.status == 401 else None
        return web.json_response(body, status=self.status, headers=headers)


# -- request models (strict: JSON types are not coerced; unknown keys refused) ---------------


_M = TypeVar("_M", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class MaintenanceBody(_Strict):
    enabled: bool


class RuleBody(_Strict):
    url: str = Field(max_length=2048, pattern=r"^[A-Za-z][A-Za-z0-9+.\-]*://")
    methods: list[str] = Field(default=[], max_length=5)
    match: Literal["exact", "prefix"] = "prefix"
    deployment: str = Field(default="", max_length=MAX_TEXT)
    description: str = Field(default="", max_length=MAX_TEXT)


class RulesBody(_Strict):
    rules: list[RuleBody]  # bounded by the 1 MiB body limit


class AccessControlBody(_Strict):
    """The AccessControl model (edge/config.py) with the bounds an admin form would enforce."""

    authorize_by_oauth_refresh: bool
    authorize_by_oauth_sso: bool
    authorize_by_user_credential: bool
    check_internal_auth_availability: bool
    sip_token_extra_ttl_s: int = Field(ge=0, le=86_400)
    credentials_refresh_min: float = Field(ge=1, le=525_600)
    credentials_cleanup_min: float = Field(ge=1, le=525_600)
    auth_rate_max: int = Field(ge=1, le=100_000)
    auth_rate_window_s: int = Field(ge=1, le=86_400)


class ZoneBody(_Strict):
    keepalive_interval_s: float = Field(ge=0.1, le=3600)
    keepalive_timeout_s: float = Field(ge=0.1, le=3600)


def _validation_error(exc: ValidationError, prefix: str = "") -> ApiError:
    errors = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        name = f"{prefix}.{loc}" if prefix and loc else (prefix or loc or "body")
        reason = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        errors.append({"field": name, "reason": reason})
    return ApiError(400, errors[0]["field"], errors[0]["reason"], errors)


def _validate(model: type[_M], data: Any) -> _M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _schema(model: type[BaseModel], *, partial: bool = False) -> dict[str, Any]:
    """An OpenAPI 3.0 schema object from a pydantic model (titles and defaults dropped)."""

    def clean(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: clean(v) for k, v in node.items() if k not in ("title", "default")}
        if isinstance(node, list):
            return [clean(v) for v in node]
        return node

    schema: dict[str, Any] = clean(model.model_json_schema(ref_template="#/components/schemas/{model}"))
    schema.pop("$defs", None)
    if partial:
        schema.pop("required", None)
        schema["minProperties"] = 1
    return schema


# -- the router --------------------------------------------------------------------------------

Handler = Callable[[web.Request, dict[str, str], Any], Awaitable[tuple[int, Any]]]


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    """Template below /api/v1, e.g. ``/allowlist/rules/{rule_id}``."""
    handler: Handler
    summary: str
    body: str | None = None
    """None, "json" (parsed, passed as a dict) or "csv" (passed as text)."""
    request_schema: dict[str, Any] | None = None
    responses: dict[int, tuple[str, dict[str, Any] | None]] = field(default_factory=dict)
    tag: str = "admin"

    def pattern(self) -> re.Pattern[str]:
        regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(self.path))
        return re.compile(regex + r"\Z")


ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["status", "field", "reason", "errors"],
    "properties": {
        "status": {"type": "integer"},
        "field": {"type": "string"},
        "reason": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["reason"],
                "properties": {
                    "field": {"type": "string"},
                    "line": {"type": "integer"},
                    "reason": {"type": "string"},
                },
            },
        },
    },
}


class AdminApi:
    """Serves the operations of one component under /api/v1 behind Basic auth."""

    def __init__(self, component: BaseComponent, title: str, operations: list[Operation]) -> None:
        self.component = component
        self.title = title
        self.operations = operations
        self._compiled = [(op, op.pattern()) for op in operations]
        lab = component.config.lab
        self._credentials = f"{lab.admin_username}:{lab.admin_password}".encode()

    def install(self, app: web.Application) -> None:
        app.router.add_get(PREFIX + "/openapi.json", self._handle_openapi)
        app.router.add_route("*", PREFIX + "{tail:(/.*)?}", self._dispatch)

    async def _handle_openapi(self, request: web.Request) -> web.Response:
        return web.json_response(self.openapi())

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            given = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(given, self._credentials)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        try:
            if not self._authorized(request):
                raise ApiError(401, "Authorization", "admin credentials required (HTTP Basic)")
            op, params = self._route(request)
            if not hasattr(self.component, "zone"):  # admin answers before the component has started
                raise ApiError(409, "", "component is starting; retry when /status says ready")
            payload = await self._body(request, op)
            status, result = await op.handler(request, params, payload)
        except ApiError as exc:
            return exc.response()
        except web.HTTPException as exc:  # e.g. 413 from aiohttp's body size limit
            return ApiError(exc.status, "body", exc.reason).response()
        if status == 204:
            return web.Response(status=204)
        if isinstance(result, str):
            return web.Response(text=result, status=status, content_type="text/csv")
        return web.json_response(result, status=status)

    def _route(self, request: web.Request) -> tuple[Operation, dict[str, str]]:
        path = request.match_info.get("tail", "") or "/"
        allowed = []
        for op, pattern in self._compiled:
            m = pattern.match(path)
            if m is None:
                continue
            if op.method == request.method:
                return op, m.groupdict()
            allowed.append(op.method)
        if allowed:
            raise _MethodNotAllowed(allowed)
        raise ApiError(404, "path", f"no endpoint {PREFIX}{path}")

    async def _body(self, request: web.Request, op: Operation) -> Any:
        if op.body is None:
            return None
        raw = await request.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "body", "not UTF-8 text") from None
        if op.body == "csv":
            return text
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ApiError(400, "body", f"not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "body", "must be a JSON object")
        if not data:
            raise ApiError(400, "body", "no field given")
        return data

    def openapi(self) -> dict[str, Any]:
        paths: dict[str, dict[str, Any]] = {}
        for op in self.operations:
            entry: dict[str, Any] = {
                "summary": op.summary,
                "operationId": f"{op.method.lower()}{re.sub(r'[^A-Za-z0-9]+', '_', op.path).rstrip('_')}",
                "tags": [op.tag],
                "responses": {},
            }
            params = re.findall(r"\{(\w+)\}", op.path)
            if params:
                entry["parameters"] = [
                    {"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params
                ]
            if op.body == "json":
                entry["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": op.request_schema or {"type": "object"}}},
                }
            elif op.body == "csv":
                entry["requestBody"] = {
                    "required": True,
                    "content": {"text/csv": {"schema": {"type": "string"}}},
                }
            answers: dict[int, tuple[str, dict[str, Any] | None]] = {
                **op.responses,
                401: ("admin credentials missing or wrong", ERROR_SCHEMA),
                405: ("method not allowed on this path", ERROR_SCHEMA),
                409: ("component still starting, or the change conflicts", ERROR_SCHEMA),
            }
            if op.body is not None:
                answers.setdefault(400, ("invalid input: the field and the reason", ERROR_SCHEMA))
                answers[413] = ("body too large", ERROR_SCHEMA)
            if params:
                answers.setdefault(404, ("no such item", ERROR_SCHEMA))
            for code, (desc, schema) in sorted(answers.items()):
                resp: dict[str, Any] = {"description": desc}
                if schema is not None:
                    ctype = "text/csv" if schema.get("format") == "csv" else "application/json"
                    resp["content"] = {ctype: {"schema": schema}}
                entry["responses"][str(code)] = resp
            paths.setdefault(PREFIX + op.path, {})[op.method.lower()] = entry
        return {
            "openapi": "3.0.3",
            "info": {
                "title": self.title,
                "version": "1.0.0",
                "description": "Admin API of the lab Expressway (shared/spec/MRA.md §8).",
            },
            "paths": paths,
            "components": {"securitySchemes": {"basicAuth": {"type": "http", "scheme": "basic"}}},
            "security": [{"basicAuth": []}],
        }


class _MethodNotAllowed(ApiError):
    def __init__(self, allowed: list[str]) -> None:
        super().__init__(405, "method", f"allowed: {', '.join(sorted(set(allowed)))}")
        self.allowed = allowed

    def response(self) -> web.Response:
        resp = super().response()
        resp.headers["Allow"] = ", ".join(sorted(set(self.allowed)))
        return resp


# -- shared pieces -----------------------------------------------------------------------------

MAINTENANCE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["enabled"],
    "properties": {"enabled": {"type": "boolean"}},
    "additionalProperties": False,
}
OBJECT: dict[str, Any] = {"type": "object"}
CSV_TEXT: dict[str, Any] = {"type": "string", "format": "csv"}
RULE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "url", "methods", "match", "automatic"],
    "properties": {
        "id": {"type": "string"},
        "url": {"type": "string"},
        "methods": {"type": "array", "items": {"type": "string"}},
        "match": {"type": "string", "enum": ["exact", "prefix"]},
        "deployment": {"type": "string"},
        "description": {"type": "string"},
        "automatic": {"type": "boolean"},
        "read_only": {"type": "boolean"},
        "origin": {"type": "string"},
    },
}
RULES_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["rules"],
    "properties": {"rules": {"type": "array", "items": RULE_SCHEMA}},
}


def _maintenance_ops(component: ExpresswayC | ExpresswayE) -> list[Operation]:
    async def get(request: web.Request, params: dict[str, str], body: Any) -> tuple[int, Any]:
        return 200, {"enabled": component.maintenance}

    async def put(request: web.Request, params: dict[str, str], body: Any) -> tuple[int, Any]:
        component.maintenance = _validate(MaintenanceBody, body).enabled
        log.info("%s: maintenance mode %s", component.name, "on" if component.maintenance else "off")
        return 200, {"enabled": component.maintenance}

    ok = ("maintenance mode", MAINTENANCE_SCHEMA)
    return [
        Operation("GET", "/maintenance", get, "Maintenance mode", responses={200: ok}),
        Operation(
            "PUT",
            "/maintenance",
            put,
            "Enter or leave maintenance mode: new calls and new proxied requests get 503 (spec §8)",
            body="json",
            request_schema=MAINTENANCE_SCHEMA,
            responses={200: ok},
        ),
    ]


# -- Expressway-E ------------------------------------------------------------------------------


def expe_api(component: ExpresswayE) -> AdminApi:
    async def zone(request: web.Request, params: dict[str, str], body: Any) -> tuple[int, Any]:
        return 200, {**component.zone_status(), "links": component.zone.link_details()}

    ops = [
        Operation(
            "GET",
            "/zone",
            zone,
            "Traversal zone state, channels and links",
            responses={200: ("zone", OBJECT)},
        ),
        *_maintenance_ops(component),
    ]
    return AdminApi(component, "Expressway-E admin API", ops)


# -- Expressway-C ------------------------------------------------------------------------------


def _rule_json(entry: Entry) -> dict[str, Any]:
    r = entry.rule
    return {
        "id": entry.rule_id,
        "url": r.url,
        "methods": r.method_list(),
        "match": r.match,
        "deployment": r.deployment,
        "description": r.description,
        "automatic": r.automatic,
        "read_only": r.automatic,
        "origin": r.origin,
    }


def _rule_from_body(body: RuleBody, field_prefix: str = "") -> Any:
    from edge_c.allowlist import Rule, RuleError

    try:
        return Rule.parse(body.url, body.methods, body.match, body.deployment, body.description)
    except RuleError as exc:
        raise ApiError(400, field_prefix + exc.field, exc.reason) from None


def _csv_error(exc: Any) -> ApiError:
    errors = [{"line": e.line, "field": e.column, "reason": e.reason} for e in exc.errors]
    first = exc.errors[0]
    return ApiError(400, first.column or "body", f"line {first.line}: {first.reason}", errors)


def expc_api(component: ExpresswayC) -> AdminApi:
    c = component
    cfg = c.config

    async def domains(request: web.Request, params: dict[str, str], body: Any) -> tuple[int, Any]:
        return 200, {
            "domains": [
                {
                    "name": cfg.lab.domain,
                    "sip_registrations_ucm": bool(cfg.ucm),
                    "im_and_presence": bool(cfg.imp),
                    "unity_connection": bool(cfg.cuc),
                }
            ]
        }

    def nodes() -> dict[str, Any]:
        return {
            **c.node_status(),  # configured and discovered nodes with their last check (spec §8)
            "down_reasons": c.health.snapshot(),
            "refreshing": c.refreshing,
            "last_refresh": c.last_refresh,
        }

    async def servers(request: web.Request, params: dict[str, str], body: Any) -> tuple[int, Any]:
        return 200, nodes()

    async def refresh(request: web.Request, params: dict[str, str], body: Any) -> tuple[int, Any]:
        if c.refreshing:
            raise ApiError(409, "", "a refresh is already running")
        result = await c.refresh_servers()
        return 200, {**nodes(), "result": result}

    async def list_rules(request: web.Request, params: dict[str, str], body: Any) -> tuple[int, Any]:
        return 200, {"rules": [_rule_json(e) for e in c.allow_list.entries()]}

    async def add_rule(request: web.Request, params: dict[str, str], body: Any) -> tuple[int, Any]:
        rule = _rule_from_body(_validate(RuleBody, body))
        rule_id = c.allow_list.add(rule)
        return 201, _rule_json(next(e for e in c.allow_list.editable() if e.rule_id == rule_id))

    async def delete_rule(request: web.Request, params: dict[str, str], body: Any) -> tuple[int, Any]:
        rule_id = params["rule_id"]
        try:
            c.allow_list.remove(rule_id)
        except KeyError:
            raise ApiError(404, "rule_id", f"no rule {rule_id!r}") from None
        except ValueError as exc:
            raise ApiError(409, "rule_id", str(exc)) from None
        return 204, None

    async def replace_rules(request: web.Request, params: dict[str, str], body: Any) -> tuple[int, Any]:
        parsed = _validate(RulesBody, body)
        rules = [_rule_from_body(r, f"rules.{i}.") for i, r in enumerate(parsed.rules)]
        c.allow_list.replace_editable(rules)
        return 200, {"rules": [_rule_json(e) for e in c.allow_list.entries()]}

    async def export_csv(request: web.Request, params: dict[str, str], body: Any) -> tuple[int, Any]:
        from edge_c.allowlist_csv import export_rules_csv

        return 200, export_rules_csv(c.allow_list.editable_rules())

    async def upload_csv(request: web.Request, params: dict[str, str], body: Any) -> tuple[int, Any]:
        from edge_c.allowlist_csv import CsvFormatError, parse_rules_csv

        try:
            rules = parse_rules_csv(body)
        except CsvFormatError as exc:
            raise _csv_error(exc) from None
        c.allow_list.replace_editable(rules)
        return 200, {"replaced": len(rules), "rules": [_rule_json(e) for e in c.allow_list.entries()]}

    async def run_tests(request: web.Request, params: dict[str, str], body: Any) -> tuple[int, Any]:
        from edge_c.allowlist_csv import CsvFormatError, run_csv_tests

        try:
            report = run_csv_tests(c.allow_list, body)
        except CsvFormatError as exc:
            raise _csv_error(exc) from None
        return 200, {
            "passed": report.passed,
            "failed": report.failed,
            "results": [dataclasses.asdict(r) for r in report.results],
        }

    async def get_access(request: web.Request, params: dict[str, str], body: Any) -> tuple[int, Any]:
        return 200, cfg.expc.access.model_dump(mode="json")

    async def put_access(request: web.Request, params: dict[str, str], body: Any) -> tuple[int, Any]:
        merged = {**cfg.expc.access.model_dump(mode="json"), **body}
        checked = _validate(AccessControlBody, merged)
        if checked.credentials_cleanup_min < checked.credentials_refresh_min:
            raise ApiError(400, "credentials_cleanup_min", "must not be below credentials_refresh_min")
        c.apply_access_control(checked.model_dump())
        return 200, cfg.expc.access.model_dump(mode="json")

    def zone_settings() -> dict[str, Any]:
        zs = cfg.expc.zone
        return {
            "name": zs.name,
            "peers": list(zs.peers),
            "username": zs.username,
            "keepalive_interval_s": zs.keepalive_interval_s,
            "keepalive_timeout_s": zs.keepalive_timeout_s,
            "reconnect_initial_s": zs.reconnect_initial_s,
            "reconnect_max_s": zs.reconnect_max_s,
            "connect_timeout_s": zs.connect_timeout_s,
            "max_hops": zs.max_hops,
        }

    async def get_zone(request: web.Request, params: dict[str, str], body: Any) -> tuple[int, Any]:
        return 200, {"settings": zone_settings(), "status": c.zone.status()}

    async def put_zone(request: web.Request, params: dict[str, str], body: Any) -> tuple[int, Any]:
        zs = cfg.expc.zone
        current = {
            "keepalive_interval_s": zs.keepalive_interval_s,
            "keepalive_timeout_s": zs.keepalive_timeout_s,
        }
        checked = _validate(ZoneBody, {**current, **body})
        if checked.keepalive_timeout_s <= checked.keepalive_interval_s:
            raise ApiError(400, "keepalive_timeout_s", "must be longer than keepalive_interval_s")
        c.apply_zone_keepalive(checked.keepalive_interval_s, checked.keepalive_timeout_s)
        return 200, {"settings": zone_settings(), "status": c.zone.status()}

    rule_req = _schema(RuleBody)
    rules_req = {
        "type": "object",
        "required": ["rules"],
        "additionalProperties": False,
        "properties": {"rules": {"type": "array", "items": rule_req}},
    }
    access_full = _schema(AccessControlBody)
    zone_schema = {"type": "object", "required": ["settings", "status"]}
    ops = [
        Operation(
            "GET", "/domains", domains, "Domains and their UC services", responses={200: ("domains", OBJECT)}
        ),
        Operation(
            "GET",
            "/servers",
            servers,
            "Discovered UCM, IM&P and Unity nodes",
            responses={200: ("nodes", OBJECT)},
        ),
        Operation(
            "POST",
            "/servers/refresh",
            refresh,
            "Refresh servers: rediscover nodes (MRA requests get 503 meanwhile, spec §8)",
            responses={200: ("nodes after the refresh", OBJECT)},
        ),
        Operation(
            "GET",
            "/allowlist/rules",
            list_rules,
            "Every allow-list rule: automatic (read-only) then editable",
            responses={200: ("rules", RULES_SCHEMA)},
        ),
        Operation(
            "POST",
            "/allowlist/rules",
            add_rule,
            "Add an editable rule",
            body="json",
            request_schema=rule_req,
            responses={201: ("the new rule", RULE_SCHEMA)},
        ),
        Operation(
            "PUT",
            "/allowlist/rules",
            replace_rules,
            "Replace every editable rule",
            body="json",
            request_schema=rules_req,
            responses={200: ("rules", RULES_SCHEMA)},
        ),
        Operation(
            "DELETE",
            "/allowlist/rules/{rule_id}",
            delete_rule,
            "Delete an editable rule (automatic rules are read-only: 409)",
            responses={204: ("deleted", None)},
        ),
        Operation(
            "GET", "/allowlist/csv", export_csv, "Editable rules as CSV", responses={200: ("CSV", CSV_TEXT)}
        ),
        Operation(
            "POST",
            "/allowlist/csv",
            upload_csv,
            "Upload rules CSV (Url,Deployment,HttpMethods,MatchType,Description): replaces editable rules",
            body="csv",
            responses={200: ("rules", OBJECT)},
        ),
        Operation(
            "POST",
            "/allowlist/tests",
            run_tests,
            "Run CSV tests (Url,ExpectedResult,Deployment,Description,HttpMethod) against the live list",
            body="csv",
            responses={
                200: (
                    "report",
                    {
                        "type": "object",
                        "required": ["passed", "failed", "results"],
                        "properties": {
                            "passed": {"type": "integer"},
                            "failed": {"type": "integer"},
                            "results": {"type": "array", "items": {"type": "object"}},
                        },
                    },
                )
            },
        ),
        Operation(
            "GET",
            "/access-control",
            get_access,
            "MRA access-control settings",
            responses={200: ("settings", access_full)},
        ),
        Operation(
            "PUT",
            "/access-control",
            put_access,
            "Change MRA access-control settings (any subset of the fields)",
            body="json",
            request_schema=_schema(AccessControlBody, partial=True),
            responses={200: ("settings", access_full)},
        ),
        Operation(
            "GET",
            "/zone",
            get_zone,
            "Traversal zone settings and state",
            responses={200: ("zone", zone_schema)},
        ),
        Operation(
            "PUT",
            "/zone",
            put_zone,
            "Change the zone keepalive (applies to links established from now on)",
            body="json",
            request_schema=_schema(ZoneBody, partial=True),
            responses={200: ("zone", zone_schema)},
        ),
        *_maintenance_ops(c),
    ]
    return AdminApi(c, "Expressway-C admin API", ops)


def build_api(component: BaseComponent) -> AdminApi | None:
    """The admin API of this component, or None for components that have none (DNS, mocks)."""
    if component.role == "expc":
        from edge_c.component import ExpresswayC

        return expc_api(cast(ExpresswayC, component))
    if component.role == "expe":
        from edge_e.component import ExpresswayE

        return expe_api(cast(ExpresswayE, component))
    return None

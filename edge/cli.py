"""The `edge` command line."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from edge.config import ConfigError, LabConfig, dump_toml, load_config

F = TypeVar("F", bound=Callable[..., Any])
console = Console(highlight=False)


def config_options(func: F) -> F:
    """--config FILE, --set key=value and --state-dir, shared by every command that reads config."""
    func = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override one configuration key, e.g. --set expc.sip_path_headers=true (repeatable).",
    )(func)
    func = click.option(
        "--state-dir",
        type=click.Path(file_okay=False),
        default=None,
        help="Where the lab keeps certificates, pids and logs (default: lab.state_dir).",
    )(func)
    func = click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        default=None,
        help="TOML file overriding the embedded defaults.",
    )(func)
    return func


def _load(config_path: str | None, overrides: tuple[str, ...], state_dir: str | None) -> LabConfig:
    extra = list(overrides)
    if state_dir:
        extra.append(f'lab.state_dir="{Path(state_dir).resolve()}"')
    try:
        return load_config(config_path, overrides=extra)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@click.group()
@click.version_option(package_name="mra-edge-lab")
def main() -> None:
    """A lab replica of the Cisco Expressway MRA edge."""


# -- edge run ---------------------------------------------------------------------------


@main.command("run")
@click.argument("component")
@config_options
@click.option("-v", "--verbose", is_flag=True)
def run_cmd(
    component: str, config_path: str | None, overrides: tuple[str, ...], state_dir: str | None, verbose: bool
) -> None:
    """Run one component (dns, ucm1, imp1, cuc1, expc, expe, …) in the foreground."""
    from edge.runtime import run_component

    config = _load(config_path, overrides, state_dir)
    try:
        name = config.component_name(component)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    _setup_logging(verbose)
    sys.exit(run_component(name, config))


# -- edge config ------------------------------------------------------------------------


@main.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("show")
@config_options
@click.option("--json", "as_json", is_flag=True, help="JSON instead of TOML.")
def config_show(
    config_path: str | None, overrides: tuple[str, ...], state_dir: str | None, as_json: bool
) -> None:
    """Print the effective configuration (defaults, file, environment and --set applied)."""
    config = _load(config_path, overrides, state_dir)
    if as_json:
        click.echo(json.dumps(config.model_dump(mode="json"), indent=2))
    else:
        click.echo(dump_toml(config))


# -- edge certs -------------------------------------------------------------------------


@main.group("certs")
def certs_group() -> None:
    """The lab PKI."""


@certs_group.command("generate")
@config_options
def certs_generate(config_path: str | None, overrides: tuple[str, ...], state_dir: str | None) -> None:
    """Create the lab CA and certificates if absent; renew expired or renamed ones."""
    from edge.lab_pki import ensure_certificates

    config = _load(config_path, overrides, state_dir)
    pki = ensure_certificates(config)
    for name, reason in pki.issued:
        click.echo(f"issued {name} ({reason})")
    click.echo(f"certificates in {pki.ca_path.parent}")


@certs_group.command("show")
@config_options
@click.option("--json", "as_json", is_flag=True)
def certs_show(
    config_path: str | None, overrides: tuple[str, ...], state_dir: str | None, as_json: bool
) -> None:
    """List the lab certificates with their names, usages and validity."""
    from edge.lab_pki import cert_dir
    from edge.pki import describe_certificates

    config = _load(config_path, overrides, state_dir)
    directory = cert_dir(config)
    if not (directory / "ca.pem").exists():
        raise click.ClickException(f"no lab PKI in {directory}; run `edge certs generate` or `edge lab up`")
    infos = describe_certificates(directory)
    if as_json:
        click.echo(json.dumps([_jsonable(i) for i in infos], indent=2, default=str))
        return
    table = Table(title=f"Lab certificates ({directory})")
    for col in ("name", "subject CN", "SAN", "EKU", "not after", "state"):
        table.add_column(col)
    for info in infos:
        san = [*info.dns_names, *info.ip_addresses, *(f"SRV:{s}" for s in info.srv_names)]
        table.add_row(
            info.name,
            info.common_name,
            "\n".join(san),
            ", ".join(info.eku),
            str(info.not_after)[:19],
            info.state,
        )
    console.print(table)


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _jsonable(getattr(obj, k)) for k in obj.__dataclass_fields__}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


# -- edge lab ---------------------------------------------------------------------------


@main.group("lab")
def lab_group() -> None:
    """Bring the whole lab up or down, and report its status."""


@lab_group.command("up")
@config_options
@click.option("--detach", is_flag=True, help="Start the lab in the background and return.")
@click.option("--no-demo", is_flag=True, help="Skip the demo MRA flow.")
def lab_up(
    config_path: str | None, overrides: tuple[str, ...], state_dir: str | None, detach: bool, no_demo: bool
) -> None:
    """Start DNS, the mock UCM roles, Expressway-C and Expressway-E, each as its own process."""
    from edge.lab import LabError, LabSupervisor, wait_zones_active

    config = _load(config_path, overrides, state_dir)
    sup = LabSupervisor(config)

    async def bring_up() -> dict[str, Any]:
        await sup.up()
        return await wait_zones_active(config, config.lab.ready_timeout_s)

    try:
        status = asyncio.run(bring_up())
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        asyncio.run(sup.down())
        raise click.ClickException("interrupted while starting; every process was stopped") from None
    print_status(status)
    if config.lab.demo and not no_demo:
        code = run_demo(config)
        if code != 0 and not detach:
            console.print("[yellow]demo flow failed; the lab stays up for inspection[/yellow]")
    if detach:
        console.print("lab running in the background; `edge lab status`, `edge lab down`")
        return
    console.print("lab running; press Ctrl-C to stop every process")
    asyncio.run(_foreground(sup, config))


async def _foreground(sup: Any, config: LabConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reported: set[str] = set()
    while not stop.is_set():
        for name, code in sup.crashed():
            if name not in reported:
                reported.add(name)
                console.print(f"[red]{name} exited with code {code}; see `edge lab status`[/red]")
        try:
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        except TimeoutError:
            pass
    console.print("stopping the lab…")
    stopped = await sup.down()
    console.print(f"stopped: {', '.join(stopped) or 'nothing'}")


def run_demo(config: LabConfig) -> int:
    """The demo MRA flow (sign in, call 9999, chat); returns its exit code."""
    try:
        from mra_client.demo import run_demo_flow
    except ImportError:
        console.print("demo flow: the client emulator is not built yet; skipped")
        return 0
    return run_demo_flow(config, console)


@lab_group.command("down")
@config_options
def lab_down(config_path: str | None, overrides: tuple[str, ...], state_dir: str | None) -> None:
    """Stop every lab process started by `edge lab up`."""
    from edge.lab import LabError, LabSupervisor

    config = _load(config_path, overrides, state_dir)
    try:
        stopped = asyncio.run(LabSupervisor(config).down())
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"stopped: {', '.join(stopped)}" if stopped else "no lab running")


@lab_group.command("restart")
@config_options
@click.argument("component")
def lab_restart(
    config_path: str | None, overrides: tuple[str, ...], state_dir: str | None, component: str
) -> None:
    """Stop one component of the running lab and start it again (e.g. `edge lab restart expe`)."""
    from edge.lab import LabError, LabSupervisor

    config = _load(config_path, overrides, state_dir)
    try:
        rec = asyncio.run(LabSupervisor(config).restart(component))
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{rec.name} restarted: pid {rec.pid}, ready")


@lab_group.command("status")
@config_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable status (spec §9).")
def lab_status_cmd(
    config_path: str | None, overrides: tuple[str, ...], state_dir: str | None, as_json: bool
) -> None:
    """Every component's pid, state and listeners, plus zone states and counts."""
    from edge.lab import LabError, lab_status

    config = _load(config_path, overrides, state_dir)
    try:
        status = asyncio.run(lab_status(config))
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(status, indent=2))
    else:
        print_status(status)
    if status["state"] != "ready":
        sys.exit(1)


def print_status(status: dict[str, Any]) -> None:
    table = Table(title=f"MRA lab: {status['state']}")
    for col in ("component", "pid", "state", "listeners"):
        table.add_column(col)
    for comp in status["components"]:
        listeners = "\n".join(
            f"{lst['name']} {lst['transport']} {lst['host']}:{lst['port']}"
            for lst in comp.get("listeners", [])
        )
        state = comp["state"]
        colour = {"ready": "green", "crashed": "red"}.get(state, "yellow")
        table.add_row(comp["name"], str(comp["pid"]), f"[{colour}]{state}[/{colour}]", listeners)
    console.print(table)
    for zone in status.get("zones", []):
        line = f"zone {zone.get('name')} on {zone['component']}: {zone.get('state')}"
        if zone.get("reason"):
            line += f" ({zone['reason']})"
        console.print(line)
    if status.get("counts"):
        console.print("counts: " + ", ".join(f"{k} {v}" for k, v in status["counts"].items()))


@lab_group.command("console")
@config_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Loopback address to serve on.")
@click.option("--port", default=9099, show_default=True, type=click.IntRange(0, 65535))
def lab_console(
    config_path: str | None, overrides: tuple[str, ...], state_dir: str | None, host: str, port: int
) -> None:
    """Serve the lab status page (every component) and /api/lab/status until Ctrl-C."""
    from edge.console import serve_console

    config = _load(config_path, overrides, state_dir)
    asyncio.run(serve_console(config, host, port))


# -- edge admin -------------------------------------------------------------------------


@main.command("admin")
@click.argument("component")
@click.argument("method", type=click.Choice(["get", "put", "post", "delete"], case_sensitive=False))
@click.argument("path")
@click.option("--data", default=None, metavar="JSON|@FILE", help="Request body, or @file to read it from.")
@click.option(
    "--content-type",
    default=None,
    help="Body type (default: text/csv for @*.csv files, else application/json).",
)
@config_options
def admin_cmd(
    component: str,
    method: str,
    path: str,
    data: str | None,
    content_type: str | None,
    config_path: str | None,
    overrides: tuple[str, ...],
    state_dir: str | None,
) -> None:
    """Call an Expressway's admin API, e.g. `edge admin expc get allowlist/rules` or
    `edge admin expc put maintenance --data '{"enabled": true}'`. PATH is below /api/v1."""
    import base64
    import urllib.error
    import urllib.request

    config = _load(config_path, overrides, state_dir)
    try:
        name = config.component_name(component)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    host, port = config.admin_endpoint(name)
    body: bytes | None = None
    ctype = content_type or "application/json"
    if data is not None:
        if data.startswith("@"):
            try:
                body = Path(data[1:]).read_bytes()
            except OSError as exc:
                raise click.ClickException(f"--data {data}: {exc}") from None
            if content_type is None and data.lower().endswith(".csv"):
                ctype = "text/csv"
        else:
            body = data.encode()
    url = f"http://{host}:{port}/api/v1/{path.lstrip('/')}"
    auth = base64.b64encode(f"{config.lab.admin_username}:{config.lab.admin_password}".encode()).decode()
    req = urllib.request.Request(url, data=body, method=method.upper())
    req.add_header("Authorization", f"Basic {auth}")
    if body is not None:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, text = resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode("utf-8", "replace")
    except OSError as exc:
        raise click.ClickException(f"{url}: {exc}") from None
    try:
        click.echo(json.dumps(json.loads(text), indent=2) if text else "")
    except ValueError:
        click.echo(text, nl=not text.endswith("\n"))
    if status >= 400:
        sys.exit(1)


# -- edge allowlist ---------------------------------------------------------------------


@main.group("allowlist")
def allowlist_group() -> None:
    """Expressway-C's HTTP allow list (spec §4)."""


@allowlist_group.command("test")
@click.argument("rules_csv", type=click.Path(exists=True, dir_okay=False))
@click.argument("tests_csv", type=click.Path(exists=True, dir_okay=False))
def allowlist_test(rules_csv: str, tests_csv: str) -> None:
    """Run CSV tests (Url,ExpectedResult,Deployment,Description,HttpMethod) against CSV rules
    (Url,Deployment,HttpMethods,MatchType,Description), offline."""
    from edge_c.allowlist_csv import allowlist_test_main

    code, output = allowlist_test_main(Path(rules_csv).read_text(), Path(tests_csv).read_text())
    click.echo(output)
    sys.exit(code)


# -- edge client ------------------------------------------------------------------------


@main.group("client")
def client_group() -> None:
    """The MRA client emulator: what a Jabber client does over MRA, against any edge."""


def edge_options(func: F) -> F:
    """--domain, --dns and --ca: where the edge is and whom to trust (any edge, not only the lab)."""
    func = click.option("--domain", default=None, help="Edge domain (default: the lab's).")(func)
    func = click.option(
        "--dns",
        "dns",
        default=None,
        metavar="HOST[:PORT]",
        help="DNS server used for _collab-edge._tls discovery (default: the lab DNS).",
    )(func)
    func = click.option(
        "--ca",
        "ca_file",
        default=None,
        type=click.Path(dir_okay=False),
        help="CA file to trust for the edge (default: the lab CA).",
    )(func)
    return func


def client_options(func: F) -> F:
    func = click.option("--user", "username", required=True, help="User name (e.g. alice).")(func)
    func = click.option("--password", default=None, help="Password (lab default for lab users).")(func)
    func = edge_options(func)
    func = click.option("--json", "as_json", is_flag=True, help="Print the ladder as JSON.")(func)
    return config_options(func)


def _parse_dns(dns: str) -> tuple[str, int]:
    host, _, port = dns.partition(":")
    if not host or (port and not (port.isdigit() and 0 < int(port) < 65536)):
        raise click.BadParameter(f"{dns!r} is not HOST[:PORT]", param_hint="--dns")
    return host, int(port) if port else 53


def _client_settings(
    config: LabConfig,
    username: str,
    password: str | None,
    domain: str | None,
    dns: str | None,
    ca_file: str | None,
) -> Any:
    from mra_client.demo import lab_client_settings

    settings = lab_client_settings(config, username, password)
    if domain:
        settings.domain = domain
    if dns:
        settings.dns_server, settings.dns_port = _parse_dns(dns)
    if ca_file:
        settings.ca_file = ca_file
    return settings


def _client_flow(
    settings: Any, *, register: bool = True, work: Callable[[Any, Any], Awaitable[None]] | None = None
) -> tuple[Any, Exception | None]:
    """Sign in (ladder), run `work(ladder, session)`, always sign out; the failed step, if any."""
    from mra_client.edge_http import StepError
    from mra_client.signin import Ladder, sign_in, sign_out

    ladder = Ladder()

    async def flow() -> StepError | None:
        try:
            session = await sign_in(settings, ladder, register=register)
            try:
                if work is not None:
                    await work(ladder, session)
            finally:
                await sign_out(session)
        except StepError as exc:
            return exc
        return None

    return ladder, asyncio.run(flow())


def _client_output(
    ladder: Any,
    error: Exception | None,
    *,
    as_json: bool,
    title: str,
    extra: dict[str, Any] | None = None,
    summary: str | None = None,
) -> None:
    from mra_client.demo import print_ladder

    if as_json:
        click.echo(json.dumps({**ladder.as_dict(), **(extra or {})}, indent=2))
    else:
        print_ladder(ladder, console, title)
        if summary:
            console.print(summary)
    if error is not None:
        raise click.ClickException(str(error))


@client_group.command("signin")
@client_options
def client_signin(
    config_path: str | None,
    overrides: tuple[str, ...],
    state_dir: str | None,
    username: str,
    password: str | None,
    domain: str | None,
    dns: str | None,
    ca_file: str | None,
    as_json: bool,
) -> None:
    """Discovery, get_edge_config, UDS, TFTP, SIP REGISTER and STUN keepalive, as a ladder."""
    config = _load(config_path, overrides, state_dir)
    ladder, error = _client_flow(_client_settings(config, username, password, domain, dns, ca_file))
    _client_output(ladder, error, as_json=as_json, title=f"{username} signs in over MRA")


@client_group.command("chat")
@client_options
@click.option("--to", "to", required=True, help="Lab user signed in inside (e.g. bob).")
@click.argument("text")
def client_chat(
    config_path: str | None,
    overrides: tuple[str, ...],
    state_dir: str | None,
    username: str,
    password: str | None,
    domain: str | None,
    dns: str | None,
    ca_file: str | None,
    as_json: bool,
    to: str,
    text: str,
) -> None:
    """Sign in over MRA, chat with an inside user (signed in straight to the IM&P), both ways."""
    from mra_client.demo import chat_over_mra

    config = _load(config_path, overrides, state_dir)
    settings = _client_settings(config, username, password, domain, dns, ca_file)

    async def chat(ladder: Any, session: Any) -> None:
        await chat_over_mra(config, ladder, session, settings, to, text)

    ladder, error = _client_flow(settings, register=False, work=chat)
    _client_output(ladder, error, as_json=as_json, title=f"{username} chats with {to} over MRA")


@client_group.command("call")
@client_options
@click.option("--to", "to", default="9999", show_default=True, help="Number to call (9999: echo test).")
@click.option("--seconds", default=10.0, show_default=True, help="Media duration.")
@click.option("--suite", default="AES_CM_128_HMAC_SHA1_80", show_default=True, help="SRTP suite offered.")
def client_call(
    config_path: str | None,
    overrides: tuple[str, ...],
    state_dir: str | None,
    username: str,
    password: str | None,
    domain: str | None,
    dns: str | None,
    ca_file: str | None,
    as_json: bool,
    to: str,
    seconds: float,
    suite: str,
) -> None:
    """Sign in over MRA and call a number with SRTP media both ways; report setup, loss, jitter, RTT."""
    from mra_client.call import CallReport, place_call

    config = _load(config_path, overrides, state_dir)
    result: dict[str, CallReport] = {}

    async def call(ladder: Any, session: Any) -> None:
        sip = session.sip
        result["call"] = await ladder.run(
            "call",
            lambda: place_call(sip, to, seconds, suite=suite),
            lambda r: f"{r.received}/{r.sent} packets back, loss {r.loss_pct}%, rtt p50 {r.rtt_ms_p50} ms",
        )

    ladder, error = _client_flow(
        _client_settings(config, username, password, domain, dns, ca_file), work=call
    )
    r = result.get("call")
    _client_output(
        ladder,
        error,
        as_json=as_json,
        title=f"{username} calls {to} over MRA",
        extra={"call": r.as_dict()} if r else None,
        summary=(
            f"  setup {r.setup_ms} ms, {r.suite}, media to {r.remote[0]}:{r.remote[1]}; sent {r.sent}, "
            f"received {r.received}, loss {r.loss_pct}%, jitter {r.jitter_ms} ms, "
            f"rtt p50 {r.rtt_ms_p50} ms p99 {r.rtt_ms_p99} ms, BYE {r.bye_status}"
        )
        if r
        else None,
    )


# -- edge load --------------------------------------------------------------------------


@main.command("load")
@click.option(
    "--users", default=10, show_default=True, type=click.IntRange(1, 100_000), help="Users to sign in."
)
@click.option("--rate", default=10.0, show_default=True, type=float, help="Sign-ins started per second.")
@click.option(
    "--concurrency",
    default=64,
    show_default=True,
    type=click.IntRange(1, 10_000),
    help="Sign-ins in flight at most.",
)
@click.option(
    "--calls", default=0, show_default=True, type=click.IntRange(0, 1_000_000), help="Calls to place."
)
@click.option("--call-rate", default=1.0, show_default=True, type=float, help="Calls placed per second.")
@click.option("--hold", default=10.0, show_default=True, type=float, help="Seconds each call lasts.")
@click.option(
    "--call-to",
    default=None,
    help="Number to call (default: the lab's echo test, 9999), or `users` for calls between load users.",
)
@click.option("--messages-per-min", default=0.0, show_default=True, type=float, help="XMPP chats per minute.")
@click.option(
    "--duration", default=60.0, show_default=True, type=float, help="The run stops after this many s."
)
@click.option(
    "--user-pattern",
    default="load{n:05d}",
    show_default=True,
    help="User names; {n} is the index (the lab's generated users are load00001…, `load.count`).",
)
@click.option("--password", default=None, help="Password, may use {n} (default: the lab's `load.password`).")
@click.option("--first", "first_index", default=1, show_default=True, type=int, help="First index n.")
@click.option("--no-xmpp", is_flag=True, help="SIP only: no XMPP session per user.")
@click.option(
    "--sip-only",
    is_flag=True,
    help="Load-test shortcut real clients never take: get_edge_config/UDS/TFTP once for the run, "
    "then per user only discovery, SIP connect, REGISTER, STUN (registration scale).",
)
@click.option(
    "--stun-interval",
    default=30.0,
    show_default=True,
    type=float,
    help="Seconds between STUN keepalives on each SIP flow (MRA HA, spec §5).",
)
@click.option("--suite", default="AES_CM_128_HMAC_SHA1_80", show_default=True, help="SRTP suite offered.")
@click.option(
    "--report", "report_path", default="edge-load-report.json", show_default=True, help="JSON report file."
)
@click.option(
    "--html", "html_path", default=None, help="HTML report file (default: the JSON path with .html)."
)
@click.option("--no-progress", is_flag=True, help="No live display (the summary is still printed).")
@edge_options
@config_options
def load_cmd(
    config_path: str | None,
    overrides: tuple[str, ...],
    state_dir: str | None,
    users: int,
    rate: float,
    concurrency: int,
    calls: int,
    call_rate: float,
    hold: float,
    call_to: str | None,
    messages_per_min: float,
    duration: float,
    user_pattern: str,
    password: str | None,
    first_index: int,
    no_xmpp: bool,
    sip_only: bool,
    stun_interval: float,
    suite: str,
    report_path: str,
    html_path: str | None,
    no_progress: bool,
    domain: str | None,
    dns: str | None,
    ca_file: str | None,
) -> None:
    """N MRA users through the edge: sign-in, registrations held, SRTP calls, chat; live progress,
    then a JSON + HTML report. Ctrl-C stops early: calls hang up, users sign out, the report is written."""
    import ssl

    from mra_client.load.command import Outputs, run_load_command
    from mra_client.load.settings import LoadSettings, LoadSettingsError
    from mra_client.signin import ClientSettings

    config = _load(config_path, overrides, state_dir)
    try:
        settings = LoadSettings(
            users=users,
            signin_rate_per_s=rate,
            signin_concurrency=concurrency,
            calls=calls,
            call_rate_per_s=call_rate,
            hold_s=hold,
            call_to=call_to or config.echo_number,
            messages_per_min=messages_per_min,
            duration_s=duration,
            user_pattern=user_pattern,
            password_pattern=password if password is not None else config.load.password,
            first_index=first_index,
            xmpp=not no_xmpp,
            sip_only=sip_only,
            stun_interval_s=stun_interval,
            suite=suite,
        )
    except LoadSettingsError as exc:
        raise click.UsageError(str(exc)) from None
    dns_host, dns_port = _parse_dns(dns) if dns else (config.dns.address, config.dns.port)
    ca = ca_file or str(config.lab.state_path / "certs" / "ca.pem")
    if not Path(ca).is_file():
        raise click.ClickException(f"CA file {ca} not found: start the lab (`edge lab up`) or pass --ca")
    try:
        trust = ssl.create_default_context(cafile=ca)  # one context for every user of the run
    except (ssl.SSLError, OSError) as exc:
        raise click.ClickException(f"CA file {ca}: {exc}") from None
    client = ClientSettings(
        username="",
        password="",
        domain=domain or config.lab.domain,
        dns_server=dns_host,
        dns_port=dns_port,
        ca_file=ca,
        ssl_context=trust,
    )
    html_file = html_path or str(Path(report_path).with_suffix(".html"))
    for path in (report_path, html_file):
        parent = Path(path).resolve().parent
        if not parent.is_dir():
            raise click.ClickException(f"cannot write {path}: {parent} is not a directory")
    code = run_load_command(settings, client, Outputs(report_path, html_file, not no_progress), console)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

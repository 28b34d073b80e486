"""Operations commands: `health`, `nodes`, `events` (follow the event stream) and `doctor`.

Like the other client commands they talk to a node's management API (`--connect`); `doctor`
asks every node it knows of (`--nodes`, else the local cluster's `cluster.json`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from aether.cli.common import (
    DEFAULT_CLUSTER_DIR,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    UNREACHABLE_HINT,
    FiniteFloatRange,
    Settings,
    call,
    echo_json,
    fail,
    json_option,
    make_client,
    report,
    watch_option,
    watching,
)
from aether.core.errors import ConfigError

if TYPE_CHECKING:
    from aether.cli.client import ManagementClient

# commands a node has not picked up yet, and steps it runs: an instance should pass through them
TRANSITIONAL = (
    "LOAD", "LOADING", "ACTIVATE", "ACTIVATING", "DEACTIVATE", "DEACTIVATING", "UNLOAD", "UNLOADING",
)
STUCK_AFTER = 30.0  # default seconds in a transitional state before doctor reports it stuck
LAG_WARN_MS = 250.0  # event-loop lag: warning (a loaded 2-core machine sees 100+ ms at start-up)
LAG_FAIL_MS = 500.0  # ... failed: peers stop hearing heartbeats soon after (0.6 s by default)
WRITES_FAILING_FAIL = 5.0  # seconds writes keep failing on a node before it is a failure
SKEW_WARN = 0.5  # seconds of clock difference between nodes: warning
SKEW_FAIL = 5.0  # ... failed
EVENTS_READ_TIMEOUT = 45.0  # three missed heartbeats: the connection is lost


def _health(client: ManagementClient) -> tuple[int, dict[str, Any]]:
    """GET /api/v1/health: (status code, document); 503 is an answer here, not an error."""
    import msgspec

    from aether.cli.client import ApiError

    answer = client.request("GET", "/api/v1/health")
    try:
        doc = msgspec.json.decode(answer.body)
    except msgspec.DecodeError:
        doc = None
    if answer.status in (200, 503) and isinstance(doc, dict) and "ready" in doc:
        return answer.status, doc
    client.check(answer)  # an error answer: ApiError with its problem document
    raise ApiError(client.target, answer.status, answer.reason, answer.body.decode(errors="replace")[:500])


# -- health and nodes -----------------------------------------------------------------------------


@click.command()
@json_option
@click.pass_obj
def health(settings: Settings, as_json: bool) -> None:
    """Is the node live and ready (has quorum)? Exit 0 if ready, 1 if not."""
    client = make_client(settings)
    code, doc = call(client, _health)
    if settings.json or as_json:
        echo_json(doc)
    elif code == 200:
        click.secho(f"✓ {doc.get('node_id')} is ready: quorum, leader {doc.get('leader') or '-'}", fg="green")
    else:
        click.secho(f"✗ {doc.get('node_id')} is live but not ready: {doc.get('reason')}", fg="red")
    if code != 200:
        raise click.exceptions.Exit(EXIT_FAILED)


@click.command()
@json_option
@watch_option
@click.pass_obj
def nodes(settings: Settings, as_json: bool, watch: bool) -> None:
    """List the cluster's members as the node sees them: cluster address, up/down, leader, and
    where each serves its management API and HTTP router (as it published them)."""
    settings.json = settings.json or as_json
    watching(settings, watch, lambda: _show_nodes(settings))


def _show_nodes(settings: Settings) -> None:
    client = make_client(settings)
    members: Any = call(client, lambda c: c.get_json("/api/v1/nodes"))
    if settings.json:
        echo_json(members)
        return
    from rich.table import Table
    from rich.text import Text

    from aether.cli import render

    table = Table(title="Nodes", title_justify="left")
    for col in ("Node", "Address", "State", "Leader", "Management", "HTTP"):
        table.add_column(col)
    for m in members:
        color = "green" if m["state"] == "up" else "red"
        table.add_row(
            Text(m["id"]), m["address"], f"[{color}]{m['state']}[/{color}]", "★" if m["leader"] else "",
            Text(m.get("management") or "-"), Text(m.get("http") or "-"),
        )
    render.console().print(table)


# -- events ------------------------------------------------------------------------------------------


def _describe_event(data: dict[str, Any]) -> str:
    t = data.get("type", "")
    if t == "node-joined":
        return f"{data.get('node')} joined"
    if t == "node-left":
        return f"{data.get('node')} left ({data.get('reason')})"
    if t == "leader-changed":
        return f"leader is now {data.get('leader') or 'none'} (was {data.get('previous') or 'none'})"
    if t == "slice-state":
        reason = f": {data['reason']}" if data.get("reason") else ""
        return f"{data.get('artifact')} on {data.get('node')} is {data.get('state')}{reason}"
    if t == "slice-removed":
        return f"{data.get('artifact')} removed from {data.get('node')}"
    if t == "blueprint-applied":
        names = ", ".join(f"{s.get('artifact')} x{s.get('instances')}" for s in data.get("slices", []))
        return f"blueprint {data.get('id')} applied: {names}"
    if t == "blueprint-deleted":
        return f"blueprint {data.get('id')} deleted"
    if t == "resync":
        return f"state under {data.get('prefix')} was replaced by a snapshot; re-read it"
    if t == "dropped":
        return f"the node dropped this stream: {data.get('reason')}"
    return str({k: v for k, v in data.items() if k not in ("type", "time")})


@click.command()
@json_option
@click.pass_obj
def events(settings: Settings, as_json: bool) -> None:
    """Follow the cluster's events (nodes joining/leaving, leader, slices, blueprints) until Ctrl-C."""
    import msgspec

    from aether.cli.client import ApiError, ApiUnreachable, StreamLost

    client = make_client(settings)
    as_json = settings.json or as_json
    try:
        for ev in client.events(EVENTS_READ_TIMEOUT):
            ev_id, ev_type, raw = ev.id, ev.event, ev.data
            try:
                data = msgspec.json.decode(raw)
            except msgspec.DecodeError:
                data = {"type": ev_type, "raw": raw}
            if not isinstance(data, dict):
                data = {"type": ev_type, "value": data}
            data.setdefault("type", ev_type)
            if ev_type == "hello":
                click.echo(
                    f"following events of {data.get('node_id')} at {client.target} (Ctrl-C stops)", err=True
                )
                continue
            if as_json:
                # the stream's event id as `seq`: the event's own `id` (a blueprint's, an
                # instance's) stays as the node sent it
                seq = int(ev_id) if ev_id and ev_id.isdigit() else ev_id
                click.echo(msgspec.json.encode({"seq": seq, **data}).decode())
            else:
                stamp = time.strftime("%H:%M:%S", time.localtime(float(data.get("time") or time.time())))
                click.echo(f"{stamp}  #{ev_id or '-':<5} {ev_type:<17} {_describe_event(data)}")
            if ev_type == "dropped":
                fail(
                    "the node dropped this stream because it fell behind",
                    EXIT_FAILED,
                    hint="Run `aether events` again; pipe it to a file if a slow consumer reads it.",
                )
    except KeyboardInterrupt:
        raise click.exceptions.Exit(EXIT_OK) from None
    except (ApiUnreachable, ApiError) as e:
        report(e)  # the usual messages, hints and exit codes
    except StreamLost as e:
        fail(
            f"lost the event stream of {client.target}: {e}",
            EXIT_UNREACHABLE,
            hint="The node may have stopped; check it with `aether health`, then run `aether events` again.",
        )


# -- doctor ------------------------------------------------------------------------------------------

OK, WARN, FAILED = "ok", "warning", "failed"
_MARK = {OK: "[green]✓ ok[/green]", WARN: "[yellow]! warning[/yellow]", FAILED: "[red]✗ failed[/red]"}


def _doctor_targets(settings: Settings, nodes_opt: str | None, cluster_dir: str) -> tuple[list[str], str]:
    """Management addresses to check (`--connect` values, ``https://`` for HTTPS) and where they
    came from. A local cluster with TLS also gives the CA (settings.ca) unless --ca does."""
    from aether.cli.client import parse_target

    if nodes_opt:
        out = []
        for part in nodes_opt.split(","):
            if part.strip():
                try:
                    scheme, address = parse_target(part)
                    out.append(f"{scheme}://{address}" if scheme else str(address))
                except ConfigError as e:
                    fail(str(e).replace("--connect", "--nodes"), EXIT_USAGE)
        if not out:
            fail("--nodes needs at least one HOST:PORT", EXIT_USAGE)
        return out, "--nodes"
    from aether.cli.local_cluster import load_record

    try:
        record = load_record(cluster_dir)
    except Exception:
        record = None
    if record is not None and record.nodes:
        if record.tls_ca and settings.ca is None:
            settings.ca = record.tls_ca
        scheme = "https://" if record.tls_ca else ""
        return (
            [f"{scheme}{record.host}:{n.management_port}" for n in record.nodes],
            f"{cluster_dir}/cluster.json",
        )
    try:
        parse_target(settings.connect)
    except ConfigError as e:
        fail(str(e), EXIT_USAGE)
    own = settings.connect.strip()
    from aether.cli.client import ApiError, ApiUnreachable

    try:  # the other members, where they published their management APIs (`nodes/{id}`)
        status: Any = make_client(settings).get_json("/api/v1/status")
        members: Any = make_client(settings).get_json("/api/v1/nodes")
    except (ApiUnreachable, ApiError):
        return [own], "--connect"
    me = status.get("node_id") if isinstance(status, dict) else None
    others = [
        m["management"] for m in (members if isinstance(members, list) else [])
        if isinstance(m, dict) and m.get("id") != me and isinstance(m.get("management"), str)
    ]
    if not others:
        return [own], "--connect"
    return [own, *others], "--connect and the addresses the members published"


def _probe(settings: Settings, address: str) -> dict[str, Any]:
    from aether.cli.client import ApiError, ApiUnreachable

    client = make_client(settings, address)
    t0 = time.time()
    try:
        code, doc = _health(client)
    except (ApiUnreachable, ApiError) as e:
        return {"address": address, "reachable": False, "error": str(e)}
    t1 = time.time()
    skew = float(doc["time"]) - (t0 + t1) / 2 if isinstance(doc.get("time"), (int, float)) else None
    return {
        "address": address,
        "reachable": True,
        "ready": code == 200,
        "node_id": doc.get("node_id"),
        "quorum": bool(doc.get("quorum")),
        "leader": doc.get("leader"),
        "reason": doc.get("reason"),
        "time": doc.get("time"),
        "skew": skew,
        "rtt": t1 - t0,
    }


def _check(name: str, verdict: str, detail: str, items: list[str] | None = None) -> dict[str, Any]:
    return {"name": name, "verdict": verdict, "detail": detail, "items": items or []}


def run_doctor(
    settings: Settings, addresses: list[str], source: str, stuck_after: float = STUCK_AFTER
) -> dict[str, Any]:
    """Every check of `aether doctor`: {verdict, source, nodes: [...], checks: [...]}."""
    from aether.cli.client import ApiError, ApiUnreachable

    probes = [_probe(settings, a) for a in addresses]
    up = [p for p in probes if p["reachable"]]
    down = [p for p in probes if not p["reachable"]]
    checks: list[dict[str, Any]] = []

    # reachability
    if not down:
        checks.append(
            _check("reachability", OK, f"{len(up)} of {len(probes)} management APIs answer ({source})")
        )
    else:
        checks.append(
            _check(
                "reachability",
                FAILED,
                f"{len(down)} of {len(probes)} management APIs do not answer ({source})",
                [p["error"] for p in down],
            )
        )
    members: list[dict[str, Any]] = []
    if up:
        client = make_client(settings, up[0]["address"])
        try:
            got = client.get_json("/api/v1/nodes")
            members = got if isinstance(got, list) else []
        except (ApiUnreachable, ApiError):
            members = []
        down_members = [m for m in members if m.get("state") != "up"]
        if members:
            checks.append(
                _check(
                    "membership",
                    WARN if down_members else OK,
                    f"{len(members) - len(down_members)} of {len(members)} members up "
                    f"as seen by {up[0]['node_id']}",
                    [f"{m.get('id')} ({m.get('address')}) is down" for m in down_members],
                )
            )
        if len(probes) < len(members):
            checks[0]["detail"] += f"; only {len(probes)} of {len(members)} members checked, pass --nodes"
            if checks[0]["verdict"] == OK:
                checks[0]["verdict"] = WARN

    # quorum
    if up:
        no_quorum = [p for p in up if not p["quorum"]]
        checks.append(
            _check(
                "quorum",
                FAILED if no_quorum else OK,
                f"{len(up) - len(no_quorum)} of {len(up)} reachable nodes have quorum",
                [f"{p['node_id']}: {p.get('reason') or 'no quorum'}" for p in no_quorum],
            )
        )
        leaders = {p["node_id"]: p["leader"] for p in up}
        distinct = set(leaders.values())
        if distinct == {None}:
            checks.append(_check("leader", FAILED, "no node knows a leader"))
        elif len(distinct) == 1:
            checks.append(_check("leader", OK, f"{len(up)} nodes agree: the leader is {distinct.pop()}"))
        else:
            checks.append(
                _check(
                    "leader",
                    FAILED,
                    "the nodes disagree about the leader (run doctor again if it just changed)",
                    [f"{n} says {lead or 'none'}" for n, lead in sorted(leaders.items())],
                )
            )
        skews = [p for p in up if p["skew"] is not None]
        if skews:
            spread = max(p["skew"] for p in skews) - min(p["skew"] for p in skews)
            rtt = max(p["rtt"] for p in skews)
            verdict = FAILED if spread > SKEW_FAIL else WARN if spread > SKEW_WARN + rtt else OK
            checks.append(
                _check(
                    "clock skew",
                    verdict,
                    f"node clocks differ by at most {spread:.3f} s (±{rtt:.3f} s measurement)",
                    [f"{p['node_id']}: {p['skew']:+.3f} s vs this machine" for p in skews if verdict != OK],
                )
            )
        checks.extend(_slice_checks(settings, up[0], stuck_after))
        statuses = _statuses(settings, up)
        checks.extend(_node_checks(statuses))
        checks.extend(_serving_checks(settings, up[0], statuses))
    verdict = (
        FAILED
        if any(c["verdict"] == FAILED for c in checks)
        else (WARN if any(c["verdict"] == WARN for c in checks) else OK)
    )
    return {"verdict": verdict, "source": source, "nodes": probes, "checks": checks}


def _statuses(settings: Settings, up: list[dict[str, Any]]) -> dict[str, dict[str, Any] | None]:
    """`GET /api/v1/status` of every reachable node: {node id: status, or None if it failed}."""
    from aether.cli.client import ApiError, ApiUnreachable

    out: dict[str, dict[str, Any] | None] = {}
    for p in up:
        client = make_client(settings, p["address"])
        try:
            doc = client.get_json("/api/v1/status")
        except (ApiUnreachable, ApiError):
            doc = None
        out[str(p["node_id"])] = doc if isinstance(doc, dict) else None
    return out


def _store_checks(statuses: dict[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
    """With the etcd store (docs/operations.md, *Running on etcd*): the check "store" names the
    backend and its endpoints, failed when a node's store has no quorum (etcd unreachable or
    without a quorum itself) or the nodes use different stores. Nothing for the embedded store,
    whose quorum the "quorum" check covers."""
    known = {n: st for n, st in statuses.items() if st is not None}
    kinds = {str(st.get("store") or "rabia") for st in known.values()}
    if "etcd" not in kinds:
        return []
    if len(kinds) > 1:
        items = [f"{n}: {st.get('store') or 'rabia'}" for n, st in sorted(known.items())]
        return [_check("store", FAILED, "the nodes use different cluster state stores", items)]
    endpoints = sorted({e for st in known.values() for e in st.get("store_endpoints") or ()})
    failed = [
        f"{n}: {st.get('store_error') or 'no quorum'}"
        for n, st in sorted(known.items())
        if not st.get("quorum")
    ]
    return [
        _check(
            "store",
            FAILED if failed else OK,
            f"etcd at {', '.join(endpoints)}: {len(known) - len(failed)} of {len(known)} nodes reach it "
            "with a quorum",
            failed,
        )
    ]


def _node_checks(statuses: dict[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
    """Store writes and event-loop lag, as every node reports them in its status."""
    writes_failed, writes_warn, lag_items = [], [], []
    lag_verdict, worst, measured = OK, 0.0, 0
    for node, st in sorted(statuses.items()):
        if st is None:
            writes_warn.append(f"{node}: its status could not be read")
            continue
        if st.get("journal_error"):
            writes_failed.append(f"{node}: the consensus journal failed: {st['journal_error']}")
        failing = st.get("store_write_failing_for")
        if isinstance(failing, (int, float)):
            line = f"{node}: writes fail for {failing:.1f} s: {st.get('store_write_error')}"
            (writes_failed if failing >= WRITES_FAILING_FAIL else writes_warn).append(line)
        lag = st.get("loop_lag_max_ms")
        if isinstance(lag, (int, float)):
            measured += 1
            worst = max(worst, float(lag))
            if lag > LAG_FAIL_MS:
                lag_verdict = FAILED
                lag_items.append(f"{node}: its event loop was blocked for up to {lag:.0f} ms "
                                 "in the last 10 s")
            elif lag > LAG_WARN_MS:
                lag_verdict = WARN if lag_verdict == OK else lag_verdict
                lag_items.append(f"{node}: event-loop lag up to {lag:.0f} ms in the last 10 s")
    checks = _store_checks(statuses)
    checks += [
        _check(
            "store writes",
            FAILED if writes_failed else WARN if writes_warn else OK,
            f"{len(writes_failed) + len(writes_warn)} of {len(statuses)} nodes report failing writes",
            writes_failed + writes_warn,
        )
    ]
    if measured:
        checks.append(
            _check("loop lag", lag_verdict, f"largest event-loop lag in the last 10 s: {worst:.0f} ms "
                   f"({measured} nodes)", lag_items)
        )
    return checks


def _serving_checks(
    settings: Settings, probe: dict[str, Any], statuses: dict[str, dict[str, Any] | None]
) -> list[dict[str, Any]]:
    """Does every deployed artifact and every route have an ACTIVE instance that a reachable node
    really runs? The store's endpoints are compared with each node's local instances."""
    from aether.cli.client import ApiError, ApiUnreachable

    client = make_client(settings, probe["address"])
    try:
        endpoints: Any = client.get_json("/api/v1/kv", {"prefix": "endpoints/"})
        routes: Any = client.get_json("/api/v1/kv", {"prefix": "routes/"})
        slices: Any = client.get_json("/api/v1/slices")
    except (ApiUnreachable, ApiError) as e:
        return [_check("serving", FAILED, f"cannot read endpoints, routes and slices: {e}")]
    # (artifact, entry) -> instances that answer; and the endpoints that do not, with why
    serving: dict[tuple[str, str], list[str]] = {}
    stale: dict[str, list[str]] = {}
    for entry in endpoints.get("entries", []):
        v = entry.get("value")
        rest = str(entry.get("key", ""))[len("endpoints/"):]
        artifact, _, tail = rest.partition("/")
        name, _, inst = tail.rpartition(":")
        if not isinstance(v, dict) or not inst.isdigit() or v.get("state") != "ACTIVE":
            continue
        node = str(v.get("node_id"))
        st = statuses.get(node)
        where = f"{name}#{inst} on {node}"
        if node not in statuses:
            stale.setdefault(artifact, []).append(f"{where}: {node} does not answer")
        elif st is None:
            stale.setdefault(artifact, []).append(f"{where}: {node}'s status could not be read")
        elif "local_instances" in st and int(inst) not in (st["local_instances"] or {}).get(artifact, []):
            stale.setdefault(artifact, []).append(
                f"{where}: advertised in the store, but {node} runs no such instance (calls to it fail)"
            )
        else:
            serving.setdefault((artifact, name), []).append(where)
    items_fail: list[str] = []
    items_warn: list[str] = []
    deployed = [s for s in slices if isinstance(s, dict) and int(s.get("desired") or 0) > 0]
    for s in deployed:
        a = str(s["artifact"])
        if not any(k[0] == a for k in serving):
            why = "; ".join(stale.get(a, [])) or "no endpoint in the store"
            items_fail.append(f"{a}: {s.get('desired')} desired, no reachable ACTIVE instance ({why})")
        elif stale.get(a):
            items_warn.extend(f"{a}: {x}" for x in stale[a])
    route_fail, total_routes = [], 0
    for entry in routes.get("entries", []):
        v = entry.get("value")
        if not isinstance(v, dict):
            continue
        total_routes += 1
        method, _, path = str(entry.get("key", ""))[len("routes/"):].partition(":")
        a, entry_name = str(v.get("artifact")), str(v.get("method"))  # RouteValue: method = entry name
        if not serving.get((a, entry_name)):
            why = "; ".join(x for x in stale.get(a, []) if x.startswith(f"{entry_name}#"))
            why = why or "no endpoint in the store"
            route_fail.append(f"{method} {path} -> {a} {entry_name}: no reachable ACTIVE instance ({why})")
    return [
        _check(
            "instances serving",
            FAILED if items_fail else WARN if items_warn else OK,
            f"{len(deployed) - len(items_fail)} of {len(deployed)} deployed artifacts have an ACTIVE "
            "instance that a reachable node runs",
            items_fail + items_warn,
        ),
        _check(
            "routes",
            FAILED if route_fail else OK,
            f"{total_routes - len(route_fail)} of {total_routes} routes have an ACTIVE instance that "
            "a reachable node runs",
            route_fail,
        ),
    ]


def _slice_checks(settings: Settings, probe: dict[str, Any], stuck_after: float) -> list[dict[str, Any]]:
    from aether.cli.client import ApiError, ApiUnreachable

    client = make_client(settings, probe["address"])
    try:
        listing: Any = client.get_json("/api/v1/kv", {"prefix": "slices/"})
    except (ApiUnreachable, ApiError) as e:
        return [_check("slices", FAILED, f"cannot read slice states: {e}")]
    now = float(probe.get("time") or time.time())
    stuck, failed, total = [], [], 0
    for entry in listing.get("entries", []):
        v = entry.get("value")
        if not isinstance(v, dict):
            continue
        total += 1
        key = str(entry.get("key", ""))[len("slices/") :]
        node, _, artifact = key.partition("/")
        state = v.get("state")
        if state == "FAILED":
            failed.append(f"{artifact} on {node}: {v.get('reason') or 'no reason given'}")
        elif state in TRANSITIONAL and isinstance(v.get("timestamp"), (int, float)):
            age = now - float(v["timestamp"])
            if age > stuck_after:
                stuck.append(f"{artifact} on {node} is {state} for {age:.0f} s")
    return [
        _check(
            "stuck instances",
            FAILED if stuck else OK,
            f"{len(stuck)} of {total} slice states transitional ({', '.join(TRANSITIONAL)}) for more than "
            f"{stuck_after:g} s",
            stuck,
        ),
        _check(
            "failed instances",
            FAILED if failed else OK,
            f"{len(failed)} of {total} slice states FAILED",
            failed,
        ),
    ]


@click.command()
@click.option(
    "--nodes",
    "nodes_opt",
    metavar="HOST:PORT,...",
    help="Management APIs of the nodes to check [default: the local cluster's cluster.json, else --connect].",
)
@click.option(
    "--cluster-dir",
    default=DEFAULT_CLUSTER_DIR,
    show_default=True,
    metavar="DIR",
    help="Local cluster directory whose cluster.json lists the nodes.",
)
@click.option(
    "--stuck-after",
    type=FiniteFloatRange(min=0),
    default=STUCK_AFTER,
    show_default=True,
    metavar="SECONDS",
    help="An instance in a transitional state (LOAD ... UNLOADING) longer than this is stuck.",
)
@json_option
@click.pass_obj
def doctor(
    settings: Settings, nodes_opt: str | None, cluster_dir: str, stuck_after: float, as_json: bool
) -> None:
    """Check what users feel: every deployed artifact and route has an ACTIVE instance that a
    reachable node really runs; no instance stuck or FAILED; store writes succeed; event loops are
    not blocked; plus reachability, quorum, leader agreement and clock skew.

    Exit 0 if every check passed or warned, 1 if one failed (users would see errors), 3 if no
    node answered.
    """
    addresses, source = _doctor_targets(settings, nodes_opt, str(Path(cluster_dir)))
    report = run_doctor(settings, addresses, source, stuck_after)
    if settings.json or as_json:
        echo_json(report)
    else:
        from rich.table import Table
        from rich.text import Text

        from aether.cli import render

        table = Table(title="Doctor", title_justify="left")
        for col in ("Check", "Verdict", "Detail"):
            table.add_column(col)
        for c in report["checks"]:
            detail = c["detail"] + "".join(f"\n  {i}" for i in c["items"])
            table.add_row(c["name"], _MARK[c["verdict"]], Text(detail))  # Text: no markup, no :emoji:
        render.console().print(table)
    if not any(p["reachable"] for p in report["nodes"]):
        fail("no node answered", EXIT_UNREACHABLE, hint=UNREACHABLE_HINT)
    if report["verdict"] == FAILED:
        raise click.exceptions.Exit(EXIT_FAILED)

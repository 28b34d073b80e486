// Aether Forge dashboard: polls the Forge REST API (same origin) and drives its controls.
// Hand-written ES2020, no framework, no build step; the only library is the vendored uPlot
// (static/vendor/). Every value from the API is inserted as text (never as HTML), and every field is
// read tolerantly: a missing field shows "?" or nothing rather than breaking the page.
"use strict";
(() => {
  const POLL_MS = 500; // the issue's target: a node kill shown within 2 s
  const HIDDEN_POLL_MS = 2000; // background tab, or Forge not answering: poll less
  const KEEP_SECONDS = 300; // chart window
  const MAX_EVENTS = 300;
  const MAX_DECISIONS = 12;
  const MAX_FAILURES = 20; // failed requests shown (the generator keeps its last 200)
  const DETAIL_CHARS = 160; // a failure's detail beyond this is cut (the whole text in its title)
  const SVG_NS = "http://www.w3.org/2000/svg";

  const $ = (sel, root = document) => root.querySelector(sel);
  const byTestId = (id) => document.querySelector(`[data-testid="${id}"]`);

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    setAttrs(e, attrs);
    for (const c of children) if (c != null) e.append(c);
    return e;
  }
  function svg(tag, attrs, ...children) {
    const e = document.createElementNS(SVG_NS, tag);
    setAttrs(e, attrs);
    for (const c of children) if (c != null) e.append(c);
    return e;
  }
  function setAttrs(e, attrs) {
    if (!attrs) return;
    for (const [k, v] of Object.entries(attrs)) {
      if (v == null || v === false) continue;
      if (k === "text") e.textContent = String(v);
      else if (k === "class") e.setAttribute("class", v);
      else e.setAttribute(k, v === true ? "" : String(v));
    }
  }
  const byId = (a, b) => String(a).localeCompare(String(b), undefined, { numeric: true });
  const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);
  const pad2 = (n) => String(n).padStart(2, "0");
  function clock(t) {
    const v = num(t);
    if (v == null) return "";
    const d = new Date(v * 1000);
    return `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
  }
  function fmtRate(v) {
    v = num(v);
    if (v == null) return "–";
    return v >= 100 ? v.toFixed(0) : v.toFixed(1);
  }
  // success_rate is a fraction (0..1) in the API; the page shows percent.
  const pct = (v) => (num(v) == null ? null : v * 100);
  function fmtPct(v) {
    v = num(v);
    return v == null ? "–" : v.toFixed(v >= 99.95 || v === 0 ? 0 : 1);
  }
  function fmtMs(v) {
    v = num(v);
    if (v == null) return "–";
    return v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2);
  }
  // A node's addresses: `http_address` (the supervisor's NodeView) or `http`.
  const addr = (n, kind) => n[`${kind}_address`] ?? n[kind] ?? null;
  const bareAddr = (a) => String(a).replace(/^[a-z]+:\/\//, "").replace(/\/+$/, "");
  // Link loss is a fraction (0..1) in the API, percent on the page.
  const lossPct = (loss) => (num(loss) == null ? 0 : loss * 100);

  // ---------------------------------------------------------------- API
  // Auth: Forge sets a cookie when the page is opened with ?token=...; same-origin fetches send it.
  // The token is also kept in memory (sent as a bearer token) and removed from the address bar.
  const params = new URLSearchParams(location.search);
  const token = params.get("token");
  if (token) {
    params.delete("token");
    const q = params.toString();
    history.replaceState(null, "", location.pathname + (q ? `?${q}` : "") + location.hash);
  }

  class ApiError extends Error {
    constructor(message, status) {
      super(message);
      this.status = status;
    }
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    if (token) headers.Authorization = `Bearer ${token}`;
    const opts = { method, headers, credentials: "same-origin", cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    let r;
    try {
      r = await fetch(path, opts);
    } catch (e) {
      throw new ApiError(`Forge unreachable (${e.message || e})`, 0);
    }
    const text = await r.text();
    let data = null;
    if (text) {
      try {
        data = JSON.parse(text);
      } catch {
        data = { detail: text.slice(0, 200) };
      }
    }
    if (!r.ok) {
      // problem documents: {"type","title","status","detail"}
      const d = data && typeof data === "object" ? data : {};
      const msg = d.detail || d.title || `HTTP ${r.status} ${r.statusText}`;
      throw new ApiError(String(msg), r.status);
    }
    return { status: r.status, data };
  }

  // ---------------------------------------------------------------- status line
  const statusEl = byTestId("status");
  function showStatus(text, isError) {
    statusEl.textContent = text;
    statusEl.classList.toggle("error", !!isError);
    statusEl.dataset.kind = isError ? "error" : "ok";
    statusEl.title = text;
  }

  // ---------------------------------------------------------------- model
  const model = {
    cluster: null,
    load: null,
    points: [], // series points, ascending t
    lastT: null, // newest point's t
    eventsNext: 0, // the last event seq seen: /api/events?since= answers the events after it
    failuresNext: 0, // the last failure seq seen: /api/load/failures?after= answers those after it
    scope: "total",
  };

  // ---------------------------------------------------------------- header
  function renderHeader(cluster, load) {
    const q = byTestId("quorum");
    if (cluster && typeof cluster.quorum === "boolean") {
      q.dataset.quorum = String(cluster.quorum);
      q.textContent = cluster.quorum ? "quorum" : "NO QUORUM";
    } else {
      q.dataset.quorum = "unknown";
      q.textContent = "quorum ?";
    }
    byTestId("leader").textContent = cluster ? cluster.leader || "none" : "?";
    byTestId("epoch").textContent = cluster && cluster.epoch != null ? String(cluster.epoch) : "?";
    const members = cluster && Array.isArray(cluster.members) ? cluster.members : null;
    byTestId("members").textContent = members ? String(members.length) : "?";
    const ls = byTestId("load-state");
    if (load) {
      const what = !load.running ? "stopped" : load.paused ? "paused" : "running";
      let text = `${what} · ${fmtRate(load.rate)} req/s`;
      if (num(load.ramping_to) != null) text += ` → ${fmtRate(load.ramping_to)}`;
      if (num(load.cpu_percent) != null) text += ` · gen CPU ${load.cpu_percent.toFixed(0)} %`;
      ls.textContent = text;
      ls.dataset.state = what;
    } else {
      ls.textContent = "none configured";
      ls.dataset.state = "none";
    }
    const rolling = byTestId("rolling");
    rolling.textContent = cluster && cluster.rolling_restart ? `rolling restart: ${cluster.rolling_restart}` : "";
    rolling.hidden = !rolling.textContent;
  }

  function setConnected(ok, why) {
    const c = byTestId("connection");
    c.dataset.connected = String(ok);
    c.textContent = ok ? "live" : "offline";
    c.title = ok ? "polling the Forge API" : why || "";
  }

  // ---------------------------------------------------------------- topology
  let topoKey = "";
  function renderTopology(cluster) {
    const nodes = (cluster && Array.isArray(cluster.nodes) ? cluster.nodes.slice() : []).sort((a, b) =>
      byId(a.id, b.id),
    );
    const links = cluster && Array.isArray(cluster.links) ? cluster.links : [];
    const members = new Set(cluster && Array.isArray(cluster.members) ? cluster.members : []);
    const leader = cluster ? cluster.leader : null;
    // what is drawn (not `last_seen`, which changes at every poll): redraw only when it changes
    const drawn = nodes.map((n) => [n.id, n.state, n.leader, n.member, n.ready, n.pid, n.restarts, addr(n, "http")]);
    const key = JSON.stringify([drawn, links, leader, [...members]]);
    if (key === topoKey) return;
    topoKey = key;

    const root = $("#topology");
    const W = 420;
    const H = 330;
    const cx = W / 2;
    const cy = 160;
    const R = nodes.length <= 1 ? 0 : 118;
    const pos = new Map();
    nodes.forEach((n, i) => {
      const a = -Math.PI / 2 + (2 * Math.PI * i) / Math.max(nodes.length, 1);
      pos.set(n.id, [cx + R * Math.cos(a), cy + R * Math.sin(a)]);
    });

    // One line per unordered pair of live (not removed) nodes; the worst direction decides its look.
    const pairs = new Map();
    const pairKey = (a, b) => (byId(a, b) <= 0 ? `${a}\u0000${b}` : `${b}\u0000${a}`);
    const alive = nodes.filter((n) => n.state !== "removed");
    for (let i = 0; i < alive.length; i++)
      for (let j = i + 1; j < alive.length; j++)
        pairs.set(pairKey(alive[i].id, alive[j].id), { a: alive[i].id, b: alive[j].id, down: false, delay: 0, loss: 0 });
    for (const l of links) {
      const p = pairs.get(pairKey(l.src, l.dst));
      if (!p) continue;
      if (l.up === false || l.blocked === true) p.down = true;
      p.delay = Math.max(p.delay, num(l.delay_ms) || 0);
      p.loss = Math.max(p.loss, lossPct(l.loss));
    }

    const linkLayer = svg("g", { class: "links" });
    const labelLayer = svg("g", { class: "link-labels" });
    for (const p of pairs.values()) {
      const [x1, y1] = pos.get(p.a);
      const [x2, y2] = pos.get(p.b);
      const faulty = p.delay > 0 || p.loss > 0;
      const cls = p.down ? "link down" : faulty ? "link faulty" : "link";
      linkLayer.append(
        svg("line", {
          class: cls,
          x1: x1.toFixed(1),
          y1: y1.toFixed(1),
          x2: x2.toFixed(1),
          y2: y2.toFixed(1),
          "data-testid": `link-${p.a}-${p.b}`,
          "data-down": String(p.down),
        }),
      );
      if (faulty && !p.down) {
        const parts = [];
        if (p.delay > 0) parts.push(`${Math.round(p.delay)} ms`);
        if (p.loss > 0) parts.push(`${+p.loss.toFixed(1)} % loss`);
        labelLayer.append(
          svg("text", { class: "link-label", x: ((x1 + x2) / 2).toFixed(1), y: ((y1 + y2) / 2).toFixed(1), "text-anchor": "middle" }, parts.join(" · ")),
        );
      }
    }

    const nodeLayer = svg("g", { class: "nodes" });
    for (const n of nodes) {
      const [x, y] = pos.get(n.id);
      const state = n.state || "unknown";
      const isLeader = n.leader === true || (leader != null && n.id === leader);
      const isMember = typeof n.member === "boolean" ? n.member : members.has(n.id);
      const g = svg("g", {
        class: "node",
        transform: `translate(${x.toFixed(1)},${y.toFixed(1)})`,
        "data-testid": `node-${n.id}`,
        "data-state": state,
        "data-leader": String(isLeader),
        "data-member": String(isMember),
        "data-ready": String(n.ready === true),
      });
      const info = [
        `${n.id}: ${state}`,
        isLeader ? "leader" : null,
        isMember ? "member" : "not a member",
        n.ready === true ? "ready" : n.ready === false ? "not ready" : null,
        n.pid != null ? `pid ${n.pid}` : null,
        n.restarts ? `${n.restarts} restarts` : null,
        addr(n, "cluster") ? `cluster ${addr(n, "cluster")}` : null,
        addr(n, "management") ? `management ${addr(n, "management")}` : null,
        addr(n, "http") ? `http ${addr(n, "http")}` : null,
      ].filter(Boolean);
      g.append(svg("title", null, info.join("\n")));
      if (isLeader) {
        g.append(svg("circle", { class: "leader-ring", r: 27 }));
        g.append(svg("text", { class: "crown", y: -31 }, "♛"));
      }
      g.append(svg("circle", { class: `body st-${state}`, r: state === "removed" ? 14 : 21 }));
      const m = /(\d+)$/.exec(String(n.id));
      g.append(svg("text", { y: 4, "font-weight": "600" }, m ? m[1] : ""));
      g.append(svg("text", { y: 38 }, String(n.id)));
      const sub = [state, isLeader ? "leader" : null, isMember ? null : "not member"].filter(Boolean).join(" · ");
      g.append(svg("text", { class: "sub", y: 50 }, sub));
      nodeLayer.append(g);
    }
    const empty = nodes.length
      ? null
      : svg("text", { x: cx, y: cy, "text-anchor": "middle", fill: "#677084" }, "no nodes yet");
    root.replaceChildren(linkLayer, labelLayer, nodeLayer, ...(empty ? [empty] : []));
  }

  // ---------------------------------------------------------------- nodes table (controls)
  const NODE_OPS = [
    ["kill", "SIGKILL the node process", "danger"],
    ["crash", "crash the node (abrupt exit)", "danger"],
    ["stop", "graceful stop", ""],
    ["restart", "restart the node process", ""],
    ["isolate", "cut this node off the network", "warn"],
    ["remove", "remove the node from the cluster", "danger"],
  ];
  const nodeRows = new Map(); // id -> {tr, stateEl, restartsEl, check}
  function renderNodesTable(cluster) {
    const body = $("#nodes-body");
    const nodes = (cluster && Array.isArray(cluster.nodes) ? cluster.nodes.slice() : []).sort((a, b) =>
      byId(a.id, b.id),
    );
    const seen = new Set();
    for (const n of nodes) {
      seen.add(n.id);
      let row = nodeRows.get(n.id);
      if (!row) {
        const stateEl = el("span", { class: "state" });
        const restartsEl = el("td");
        const check = el("input", { type: "checkbox", "data-testid": `group-b-${n.id}`, title: `${n.id} in group B` });
        const actions = el("td", { class: "actions" });
        for (const [op, title, cls] of NODE_OPS)
          actions.append(
            el("button", {
              "data-action": "node",
              "data-op": op,
              "data-node": n.id,
              "data-testid": `${op}-${n.id}`,
              title: `${title} (${n.id})`,
              class: cls || null,
              text: op,
            }),
          );
        const tr = el(
          "tr",
          { "data-testid": `row-${n.id}` },
          el("td", { text: n.id }),
          el("td", null, stateEl),
          restartsEl,
          actions,
          el("td", null, check),
        );
        row = { tr, stateEl, restartsEl, check };
        nodeRows.set(n.id, row);
      }
      const state = n.state || "unknown";
      row.stateEl.textContent = state;
      row.stateEl.className = `state st-${state}`;
      row.tr.dataset.state = state;
      row.restartsEl.textContent = n.restarts != null ? String(n.restarts) : "";
      const removed = state === "removed";
      for (const b of row.tr.querySelectorAll("button")) if (!b.dataset.busy) b.disabled = removed;
      row.check.disabled = removed;
      body.append(row.tr); // keeps the sorted order; moving a row keeps its listeners and checkbox
    }
    for (const [id, row] of nodeRows)
      if (!seen.has(id)) {
        row.tr.remove();
        nodeRows.delete(id);
      }
  }

  // Keeps a <select>'s options equal to `items` ([value, label] or [value, label, group]) and its
  // selection when still offered.
  function syncSelect(select, items, fixed = []) {
    const all = fixed.concat(items);
    const key = JSON.stringify(all);
    if (select.dataset.key === key) return;
    select.dataset.key = key;
    const keep = select.value;
    const groups = new Map();
    const children = [];
    for (const [value, label, group] of all) {
      const opt = el("option", { value, text: label });
      if (!group) children.push(opt);
      else {
        if (!groups.has(group)) {
          const og = el("optgroup", { label: group });
          groups.set(group, og);
          children.push(og);
        }
        groups.get(group).append(opt);
      }
    }
    select.replaceChildren(...children);
    if (all.some(([v]) => v === keep)) select.value = keep;
  }

  function renderSelects(cluster) {
    const nodes = (cluster && Array.isArray(cluster.nodes) ? cluster.nodes : [])
      .filter((n) => n.state !== "removed")
      .map((n) => n.id)
      .sort(byId);
    const items = nodes.map((id) => [id, id]);
    const src = byTestId("link-src");
    const dst = byTestId("link-dst");
    syncSelect(src, items);
    syncSelect(dst, items);
    if (src.value && src.value === dst.value && nodes.length > 1 && !dst.dataset.touched)
      dst.value = nodes.find((id) => id !== src.value);
    syncSelect(byTestId("slice-node"), items, [["", "any"]]);
    const placement = cluster && Array.isArray(cluster.placement) ? cluster.placement : [];
    const artifacts = [...new Set(placement.map((p) => p.artifact).filter(Boolean))].sort();
    syncSelect(
      byTestId("slice-artifact"),
      artifacts.map((a) => [a, a]),
    );
    // the update control names a slice without its version (group:name)
    const names = [...new Set(artifacts.map((a) => a.split(":").slice(0, 2).join(":")))].sort();
    syncSelect(
      byTestId("update-artifact"),
      names.map((a) => [a, a]),
    );
  }

  // ---------------------------------------------------------------- placement, targets, controller
  let placementKey = "";
  function renderPlacement(cluster) {
    const placement = cluster && Array.isArray(cluster.placement) ? cluster.placement : [];
    const nodeIds = (cluster && Array.isArray(cluster.nodes) ? cluster.nodes : [])
      .filter((n) => n.state !== "removed")
      .map((n) => n.id);
    for (const p of placement) if (p.node && !nodeIds.includes(p.node)) nodeIds.push(p.node);
    nodeIds.sort(byId);
    const key = JSON.stringify([placement, nodeIds]);
    if (key === placementKey) return;
    placementKey = key;
    const table = byTestId("placement");
    const artifacts = [...new Set(placement.map((p) => p.artifact))].sort();
    table.tHead.replaceChildren(
      el("tr", null, el("th", { text: "artifact" }), ...nodeIds.map((id) => el("th", { text: id })), el("th", { text: "total" })),
    );
    const rows = artifacts.map((a) => {
      let total = 0;
      const cells = nodeIds.map((id) => {
        const here = placement.filter((p) => p.artifact === a && p.node === id);
        if (!here.length) return el("td", { class: "cell", text: "·" });
        const count = here.reduce((s, p) => s + (num(p.instances) ?? 1), 0);
        total += count;
        const states = [...new Set(here.map((p) => String(p.state || "unknown").toLowerCase()))];
        return el(
          "td",
          { class: "cell", "data-testid": `placement-${a}-${id}`, "data-state": states.join(",") },
          el("span", { class: `ps-${states[0]}`, title: `${a} on ${id}: ${states.join(", ")}`, text: String(count) }),
        );
      });
      return el("tr", null, el("td", { text: a }), ...cells, el("td", { text: String(total) }));
    });
    if (!rows.length)
      rows.push(el("tr", null, el("td", { colspan: nodeIds.length + 2, class: "none", text: "nothing deployed" })));
    table.tBodies[0].replaceChildren(...rows);
  }

  let targetsKey = "";
  function renderTargets(load) {
    const targets = load && Array.isArray(load.targets) ? load.targets : [];
    const key = JSON.stringify(targets);
    if (key === targetsKey) return;
    targetsKey = key;
    const rows = targets.map((t) => {
      const errors = t.errors && typeof t.errors === "object" ? t.errors : {};
      const errText = Object.entries(errors)
        .filter(([, n]) => n)
        .map(([k, n]) => `${k}: ${n}`)
        .join(", ");
      return el(
        "tr",
        { "data-testid": `target-${t.name}` },
        el("td", { text: t.name ?? "?" }),
        el("td", { text: t.sent ?? "" }),
        el("td", { text: t.ok ?? "" }),
        el("td", { text: t.failed ?? "" }),
        el("td", { text: fmtPct(pct(t.success_rate)) }),
        el("td", { text: fmtMs(t.p99_ms) }),
        el("td", { text: errText || "–" }),
      );
    });
    if (!rows.length) rows.push(el("tr", null, el("td", { colspan: 7, class: "none", text: "no load" })));
    byTestId("targets").tBodies[0].replaceChildren(...rows);
  }

  // "key=value" for the fields of a decision or alert not shown otherwise.
  function restFields(o, skip) {
    return Object.entries(o || {})
      .filter(([k, v]) => !skip.includes(k) && v != null && v !== "")
      .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`)
      .join(" ");
  }

  let controllerKey = "";
  function renderController(cluster) {
    const decisions = cluster && Array.isArray(cluster.decisions) ? cluster.decisions : [];
    const alerts = cluster && Array.isArray(cluster.alerts) ? cluster.alerts : [];
    const key = JSON.stringify([decisions, alerts]);
    if (key === controllerKey) return;
    controllerKey = key;
    const alertItems = alerts.map((a) => {
      const name = a.kind || a.name || a.title || "alert";
      const msg = a.message || a.detail || a.summary || "";
      return el(
        "li",
        { class: "k-bad" },
        a.time != null ? el("span", { class: "t", text: clock(a.time) }) : null,
        " ",
        el("span", { class: "kind", text: name }),
        " ",
        a.artifact ? `${a.artifact} ` : "",
        typeof msg === "string" ? msg : JSON.stringify(msg),
        " ",
        restFields(a, ["time", "kind", "name", "title", "artifact", "message", "detail", "summary"]),
      );
    });
    byTestId("alerts").replaceChildren(...(alertItems.length ? alertItems : [el("li", { class: "none", text: "no active alerts" })]));
    const latest = decisions
      .slice()
      .sort((a, b) => (num(b.time) ?? 0) - (num(a.time) ?? 0))
      .slice(0, MAX_DECISIONS);
    const items = latest.map((d) =>
      el(
        "li",
        { class: "k-ctl" },
        el("span", { class: "t", text: clock(d.time) }),
        " ",
        el("span", { class: "kind", text: d.kind || "decision" }),
        " ",
        d.artifact ? `${d.artifact} ` : "",
        typeof d.detail === "string" ? `${d.detail} ` : d.detail != null ? `${JSON.stringify(d.detail)} ` : "",
        restFields(d, ["time", "kind", "artifact", "detail"]),
      ),
    );
    byTestId("decisions").replaceChildren(...(items.length ? items : [el("li", { class: "none", text: "no decisions yet" })]));
  }

  // ---------------------------------------------------------------- load slider
  const slider = byTestId("load-rate");
  const sliderOut = byTestId("load-rate-value");
  let sliderHeld = false; // pointer down on the slider
  let sliderQuietUntil = 0; // after a change, let the server catch up before following its rate
  function renderLoad(load, maxFromState) {
    for (const id of ["load-rate", "ramp", "load-pause", "load-resume"]) byTestId(id).disabled = !load;
    if (!load) return;
    const rate = num(load.rate) ?? 0;
    const maxRate = num(load.max_rate) ?? num(maxFromState) ?? Math.max(2000, Math.ceil((rate * 2) / 100) * 100);
    byTestId("load-pause").disabled = !!load.paused;
    byTestId("load-resume").disabled = !load.paused && !!load.running;
    if (sliderHeld || document.activeElement === slider || Date.now() < sliderQuietUntil) return;
    if (String(maxRate) !== slider.max) slider.max = String(maxRate);
    slider.value = String(Math.round(rate));
    sliderOut.textContent = String(Math.round(rate));
  }
  slider.addEventListener("pointerdown", () => (sliderHeld = true));
  window.addEventListener("pointerup", () => (sliderHeld = false));
  slider.addEventListener("input", () => {
    sliderOut.textContent = slider.value;
  });
  slider.addEventListener("change", () => {
    const rate = Number(slider.value);
    sliderOut.textContent = slider.value;
    sliderQuietUntil = Date.now() + 2000;
    control(`load rate ${rate}/s`, "PUT", "/api/load/rate", { rate }, null);
    slider.blur();
  });

  // ---------------------------------------------------------------- series and charts
  function metricsOf(point, scope) {
    if (!point) return null;
    if (scope === "total") return point.total || null;
    const i = scope.indexOf(":");
    const kind = scope.slice(0, i);
    const name = scope.slice(i + 1);
    const bucket = kind === "route" ? point.targets : point.nodes;
    return (bucket && bucket[name]) || null;
  }

  // Two shapes are accepted: the load generator's flat points (one per second and series:
  // {t, scope: "total"|"target"|"node", name, sent, ok, failed, success_rate, p50_ms, p99_ms, ...})
  // and grouped ones ({t, total: {...}, targets: {name: {...}}, nodes: {addr: {...}}}). Both
  // become the grouped shape, one per second.
  function groupPoints(raw) {
    const byT = new Map();
    for (const p of raw) {
      const t = num(p && p.t);
      if (t == null) continue;
      if (p.scope == null) {
        byT.set(t, p);
        continue;
      }
      let g = byT.get(t);
      if (!g) byT.set(t, (g = { t, total: null, targets: {}, nodes: {} }));
      if (p.scope === "total") g.total = p;
      else if (p.scope === "target" || p.scope === "route") g.targets[p.name] = p;
      else if (p.scope === "node") g.nodes[p.name] = p;
    }
    return [...byT.values()].sort((a, b) => a.t - b.t);
  }

  // Requests answered per second (ok + failed), unless the API says `throughput` itself.
  function throughputOf(m) {
    if (num(m.throughput) != null) return m.throughput;
    const ok = num(m.ok);
    const failed = num(m.failed);
    return ok == null && failed == null ? null : (ok ?? 0) + (failed ?? 0);
  }

  function addPoints(data) {
    const pts = groupPoints(data && Array.isArray(data.points) ? data.points : []);
    let added = 0;
    for (const p of pts) {
      const t = num(p && p.t);
      if (t == null || (model.lastT != null && t <= model.lastT)) continue;
      model.points.push(p);
      model.lastT = t;
      added++;
    }
    if (!added) return false;
    const cutoff = model.lastT - KEEP_SECONDS;
    let drop = 0;
    while (drop < model.points.length && model.points[drop].t < cutoff) drop++;
    if (drop) model.points.splice(0, drop);
    return true;
  }

  function nodeLabel(key) {
    const nodes = model.cluster && Array.isArray(model.cluster.nodes) ? model.cluster.nodes : [];
    const k = bareAddr(key);
    const n = nodes.find(
      (n) => n.id === key || ["http", "management", "cluster"].some((a) => addr(n, a) && bareAddr(addr(n, a)) === k),
    );
    return n && n.id !== key ? `${n.id} (${key})` : key;
  }

  function renderScopes() {
    const routes = new Set();
    const nodeKeys = new Set();
    for (const t of (model.load && model.load.targets) || []) if (t && t.name) routes.add(t.name);
    const last = model.points[model.points.length - 1];
    if (last) {
      for (const k of Object.keys(last.targets || {})) routes.add(k);
      for (const k of Object.keys(last.nodes || {})) nodeKeys.add(k);
    }
    const items = [...[...routes].sort().map((r) => [`route:${r}`, r, "routes"]), ...[...nodeKeys].sort(byId).map((k) => [`node:${k}`, nodeLabel(k), "nodes"])];
    const sel = byTestId("scope");
    syncSelect(sel, items, [["total", "total (all routes)"]]);
    model.scope = sel.value || "total";
  }

  const charts = {};
  function xRange(min, max) {
    if (max == null) {
      const now = Date.now() / 1000;
      return [now - 60, now];
    }
    return [Math.min(min, max - 60), max];
  }
  const CHART_H = 215;
  function makeChart(id, title, series, yRange) {
    const host = document.getElementById(id);
    const opts = {
      title,
      width: Math.max(host.clientWidth, 200),
      height: CHART_H,
      // x: the points kept, at least the last minute (a single point would span years otherwise)
      scales: {
        x: { time: true, range: (u, min, max) => xRange(min, max) },
        y: yRange ? { range: yRange } : { auto: true },
      },
      series: [{}, ...series],
      axes: [{ size: 28 }, { size: 50 }],
      legend: { show: true, live: false },
      cursor: { drag: { x: false, y: false } },
    };
    const data = [[], ...series.map(() => [])];
    return { chart: new uPlot(opts, data, host), host };
  }
  function initCharts() {
    if (typeof uPlot !== "function") {
      showStatus("charts unavailable: uPlot did not load", true);
      return;
    }
    // y from 0 (a flat line near 50 req/s must not look like wild swings)
    const fromZero = (u, min, max) => [0, max == null || !(max > 0) ? 1 : max * 1.15];
    charts.throughput = makeChart(
      "chart-throughput",
      "Throughput (req/s)",
      [
        { label: "answered", stroke: "#3461c1", fill: "rgba(52,97,193,0.08)", width: 1.5 },
        { label: "sent", stroke: "#9aa3b5", width: 1, dash: [4, 3] },
      ],
      fromZero,
    );
    charts.success = makeChart(
      "chart-success",
      "Success rate (%)",
      [{ label: "success %", stroke: "#2e9d57", width: 1.5 }],
      [0, 100],
    );
    charts.latency = makeChart(
      "chart-latency",
      "Latency (ms)",
      [
        { label: "p50", stroke: "#7d4cc2", width: 1.5 },
        { label: "p99", stroke: "#d64541", width: 1.5 },
      ],
      fromZero,
    );
  }
  function resizeCharts() {
    for (const c of Object.values(charts)) {
      const w = Math.max(c.host.clientWidth, 200);
      if (w !== c.chart.width) c.chart.setSize({ width: w, height: CHART_H });
    }
  }
  window.addEventListener("resize", () => requestAnimationFrame(resizeCharts));

  function renderCharts() {
    const scope = model.scope;
    const xs = [];
    const thr = [];
    const offered = [];
    const ok = [];
    const p50 = [];
    const p99 = [];
    for (const p of model.points) {
      const m = metricsOf(p, scope) || {};
      xs.push(p.t);
      thr.push(throughputOf(m));
      offered.push(num(m.sent));
      ok.push(pct(m.success_rate));
      p50.push(num(m.p50_ms));
      p99.push(num(m.p99_ms));
    }
    const lastM = metricsOf(model.points[model.points.length - 1], scope) || {};
    byTestId("latest-throughput").textContent = fmtRate(throughputOf(lastM));
    byTestId("latest-success").textContent = fmtPct(pct(lastM.success_rate));
    byTestId("latest-p50").textContent = fmtMs(lastM.p50_ms);
    byTestId("latest-p99").textContent = fmtMs(lastM.p99_ms);
    if (!charts.throughput) return;
    charts.throughput.chart.setData([xs, thr, offered]);
    charts.success.chart.setData([xs, ok]);
    charts.latency.chart.setData([xs, p50, p99]);
  }
  byTestId("scope").addEventListener("change", (e) => {
    model.scope = e.target.value;
    renderCharts();
  });

  // ---------------------------------------------------------------- timeline
  // The supervisor's kinds: node-<state>, leader, quorum, placement, member, control (what was
  // asked), fault (network and slice faults), rolling, cluster:<event> (the nodes' own events,
  // cluster:rollout for each step of an update).
  function kindClass(kind, message) {
    const k = String(kind || "").toLowerCase();
    const m = String(message || "").toLowerCase();
    const bad = /(kill|crash|down|fail|lost|error|exit|unhealthy|alert|died|frozen|gone)/;
    const good = /(up|start|ready|restart|join|add|gained|regained|recover|member|active|done)/;
    if (k.startsWith("node-")) return bad.test(k) ? "k-bad" : good.test(k) ? "k-good" : "k-muted";
    if (k === "leader" || k.includes("leader")) return "k-leader";
    if (k === "quorum") return bad.test(m) ? "k-bad" : "k-good";
    if (/(^|:)fault$/.test(k) || /(partition|isolate|link|network)/.test(k)) return "k-net";
    if (k === "control") return "k-ctl";
    // a rollout's steps (cluster:rollout): red when it rolls back or was aborted, green when done
    if (k.endsWith("rollout"))
      return /(rolling-back|rolled-back|aborted)/.test(m) ? "k-bad" : /succeeded/.test(m) ? "k-good" : "k-ctl";
    if (/(load|ramp|rate|pause|resume)/.test(k)) return "k-load";
    if (k === "placement") return bad.test(m) ? "k-bad" : "k-good";
    if (/(controller|scal|decision)/.test(k)) return "k-ctl";
    if (bad.test(k)) return "k-bad";
    if (good.test(k)) return "k-good";
    return k.startsWith("cluster:") ? "k-muted" : "";
  }
  function addEvents(data) {
    if (data && Number.isInteger(data.next) && data.next < model.eventsNext) {
      // numbered from 1 again (another Forge answers on this address): start the timeline over;
      // this answer holds only those above the old number, the next poll asks for them all
      model.eventsNext = 0;
      byTestId("timeline").replaceChildren();
      return;
    }
    const events = data && Array.isArray(data.events) ? data.events.slice() : [];
    const seen = model.eventsNext;
    if (data && Number.isInteger(data.next)) model.eventsNext = Math.max(model.eventsNext, data.next);
    if (!events.length) return;
    events.sort((a, b) => (num(a.seq) ?? 0) - (num(b.seq) ?? 0));
    const list = byTestId("timeline");
    const none = list.querySelector("li.none");
    if (none) none.remove();
    for (const e of events) {
      if (num(e.seq) != null) {
        if (e.seq <= seen) continue; // already shown
        model.eventsNext = Math.max(model.eventsNext, e.seq);
      }
      const li = el(
        "li",
        { class: kindClass(e.kind, e.message), "data-kind": e.kind || "", "data-seq": e.seq ?? "" },
        el("span", { class: "t", text: clock(e.time) }),
        " ",
        el("span", { class: "kind", text: e.kind || "event" }),
        " ",
        // the node, unless the message names it already
        e.node && !String(e.message || "").includes(e.node) ? `${e.node} ` : "",
        e.message || "",
      );
      list.prepend(li);
    }
    while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
  }

  // ---------------------------------------------------------------- recent failures
  // The load generator's failed requests ({seq, t, target, node, cause, detail}), newest first;
  // at most MAX_FAILURES rows: new ones are prepended, the oldest dropped.
  function cut(text, max) {
    return text.length <= max ? text : `${text.slice(0, max - 1)}…`;
  }
  function failureRow(f) {
    const detail = typeof f.detail === "string" ? f.detail : f.detail == null ? "" : JSON.stringify(f.detail);
    const node = f.node ? nodeLabel(String(f.node)) : "–";
    return el(
      "tr",
      { "data-seq": f.seq ?? "", "data-cause": f.cause ?? "" },
      el("td", { class: "t", text: clock(f.t), title: `#${f.seq ?? "?"}` }),
      el("td", { class: "cause", text: f.cause ?? "?" }),
      el("td", { text: f.target ?? "?" }),
      el("td", { text: node }),
      el("td", { class: "detail", text: cut(detail, DETAIL_CHARS) || "–", title: detail || null }),
    );
  }
  function renderFailuresNote(text) {
    const body = byTestId("failures").tBodies[0];
    body.replaceChildren(el("tr", null, el("td", { colspan: 5, class: "none", text })));
  }
  function renderFailuresCount() {
    const n = model.failuresNext;
    byTestId("failures-count").textContent = n ? `${n} since the load started` : "";
  }
  // `data`: the answer of /api/load/failures, or null when there is no load.
  function addFailures(data) {
    if (data == null) {
      if (byTestId("failures").dataset.state !== "none") {
        byTestId("failures").dataset.state = "none";
        model.failuresNext = 0;
        renderFailuresNote("no load");
        renderFailuresCount();
      }
      return;
    }
    const table = byTestId("failures");
    const nxt = Number.isInteger(data.next) ? data.next : null;
    const restarted = nxt != null && nxt < model.failuresNext;
    if (restarted) model.failuresNext = 0; // numbered from 1 again (another load generator)
    if (restarted || !table.dataset.state || table.dataset.state === "none") {
      table.dataset.state = "empty";
      renderFailuresNote("no failed request");
    }
    if (restarted) {
      // this answer holds only those above the old number: the next poll asks for them all
      renderFailuresCount();
      return;
    }
    const fresh = (Array.isArray(data.failures) ? data.failures : [])
      .filter((f) => f && num(f.seq) != null && f.seq > model.failuresNext)
      .sort((a, b) => a.seq - b.seq)
      .slice(-MAX_FAILURES);
    if (nxt != null) model.failuresNext = Math.max(model.failuresNext, nxt);
    if (fresh.length) {
      model.failuresNext = Math.max(model.failuresNext, fresh[fresh.length - 1].seq);
      const body = table.tBodies[0];
      if (table.dataset.state === "empty") body.replaceChildren();
      table.dataset.state = "shown";
      for (const f of fresh) body.prepend(failureRow(f));
      while (body.rows.length > MAX_FAILURES) body.lastElementChild.remove();
    }
    renderFailuresCount();
  }

  // ---------------------------------------------------------------- polling
  let polling = false;
  let again = false;
  let timer = null;
  async function poll() {
    if (polling) {
      again = true;
      return;
    }
    polling = true;
    clearTimeout(timer);
    try {
      const seriesPath = model.lastT == null ? "/api/series" : `/api/series?since=${model.lastT}`;
      const state = api("GET", "/api/state");
      // the failures only with a load generator (without one the API answers 409)
      const failures = state.then((r) =>
        r.data && r.data.load ? api("GET", `/api/load/failures?after=${model.failuresNext}`) : null,
      );
      const [st, se, ev, fa] = await Promise.allSettled([
        state,
        api("GET", seriesPath),
        api("GET", `/api/events?since=${model.eventsNext}`),
        failures,
      ]);
      if (st.status === "fulfilled") {
        const d = st.value.data || {};
        model.cluster = d.cluster || null;
        model.load = d.load || null;
        setConnected(true);
        renderHeader(model.cluster, model.load);
        renderTopology(model.cluster);
        renderNodesTable(model.cluster);
        renderSelects(model.cluster);
        renderPlacement(model.cluster);
        renderController(model.cluster);
        renderTargets(model.load);
        renderLoad(model.load, d.max_rate);
      } else {
        setConnected(false, st.reason && st.reason.message);
        if (st.reason && st.reason.status === 401) showStatus(`not authorized: ${st.reason.message} (open the URL with ?token=...)`, true);
      }
      if (se.status === "fulfilled" && addPoints(se.value.data)) {
        renderScopes();
        renderCharts();
      }
      if (ev.status === "fulfilled") addEvents(ev.value.data);
      if (fa.status === "fulfilled") addFailures(fa.value && (fa.value.data || {}));
      else if (fa.reason && fa.reason.status === 409) addFailures(null);
    } finally {
      polling = false;
      const offline = byTestId("connection").dataset.connected === "false";
      const delay = again ? 0 : document.hidden || offline ? HIDDEN_POLL_MS : POLL_MS;
      again = false;
      timer = setTimeout(poll, delay);
    }
  }
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) poll();
  });

  // ---------------------------------------------------------------- controls
  function summary(res) {
    const d = res.data;
    if (d && typeof d === "object") {
      const m = d.message || d.detail || d.result || d.status;
      if (typeof m === "string" && m) return `${m} (${res.status})`;
    }
    return `ok (${res.status})`;
  }

  async function control(label, method, path, body, button) {
    if (button) {
      button.dataset.busy = "1";
      button.disabled = true;
    }
    showStatus(`${label}…`, false);
    try {
      const res = await api(method, path, body);
      showStatus(`${label}: ${summary(res)}`, false);
    } catch (e) {
      showStatus(`${label} failed: ${e.message}`, true);
    } finally {
      if (button) {
        delete button.dataset.busy;
        button.disabled = false;
      }
      poll();
    }
  }

  const enc = encodeURIComponent;
  const numberOf = (testid, fallback = 0) => {
    const v = Number(byTestId(testid).value);
    return Number.isFinite(v) ? v : fallback;
  };

  function partitionGroups() {
    const a = [];
    const b = [];
    for (const [id, row] of nodeRows) {
      if (row.tr.dataset.state === "removed") continue;
      (row.check.checked ? b : a).push(id);
    }
    return [a.sort(byId), b.sort(byId)];
  }

  const ACTIONS = {
    node(btn) {
      const id = btn.dataset.node;
      const op = btn.dataset.op;
      if (op === "remove") return control(`remove ${id}`, "DELETE", `/api/nodes/${enc(id)}`, undefined, btn);
      if (op === "isolate") return control(`isolate ${id}`, "POST", `/api/network/isolate/${enc(id)}`, {}, btn);
      return control(`${op} ${id}`, "POST", `/api/nodes/${enc(id)}/${op}`, {}, btn);
    },
    "kill-leader": (btn) => control("kill leader", "POST", "/api/leader/kill", {}, btn),
    "add-node": (btn) => control("add node", "POST", "/api/nodes", {}, btn),
    "rolling-restart": (btn) => control("rolling restart", "POST", "/api/rolling-restart", {}, btn),
    partition(btn) {
      const [a, b] = partitionGroups();
      if (!a.length || !b.length) {
        showStatus("partition: tick 'grp B' for the nodes of group B and leave at least one node in group A", true);
        return;
      }
      return control(`partition [${a.join(", ")}] | [${b.join(", ")}]`, "POST", "/api/network/partition", { groups: [a, b] }, btn);
    },
    "heal-network": (btn) => control("heal network", "POST", "/api/network/heal", {}, btn),
    "set-link"(btn) {
      const src = byTestId("link-src").value;
      const dst = byTestId("link-dst").value;
      if (!src || !dst || src === dst) {
        showStatus("link: pick two different nodes", true);
        return;
      }
      const body = {
        delay_ms: numberOf("link-delay"),
        jitter_ms: numberOf("link-jitter"),
        loss: Math.min(Math.max(numberOf("link-loss"), 0), 100) / 100,
        both_ways: byTestId("link-both").checked,
      };
      const what = `link ${src}→${dst}: ${body.delay_ms} ms, ${Math.round(body.loss * 100)} % loss`;
      return control(what, "PUT", `/api/network/links/${enc(src)}/${enc(dst)}`, body, btn);
    },
    "slice-fail"(btn) {
      const artifact = byTestId("slice-artifact").value;
      if (!artifact) {
        showStatus("slice fault: no artifact deployed", true);
        return;
      }
      const node = byTestId("slice-node").value || null;
      const body = {
        node,
        error_rate: Math.min(Math.max(numberOf("slice-error"), 0), 100) / 100,
        delay_ms: numberOf("slice-delay"),
        unhealthy: byTestId("slice-unhealthy").checked,
      };
      return control(`fail ${artifact}${node ? ` on ${node}` : ""}`, "POST", `/api/slices/${enc(artifact)}/fail`, body, btn);
    },
    "slice-heal"(btn) {
      const artifact = byTestId("slice-artifact").value;
      if (!artifact) {
        showStatus("slice heal: no artifact deployed", true);
        return;
      }
      return control(`heal ${artifact}`, "POST", `/api/slices/${enc(artifact)}/heal`, {}, btn);
    },
    update(btn) {
      const artifact = byTestId("update-artifact").value;
      const version = byTestId("update-version").value.trim();
      if (!artifact || !version) {
        showStatus("update: pick a slice and type the version to roll it to", true);
        return;
      }
      const body = { version };
      const strategy = byTestId("update-strategy").value;
      if (strategy) body.strategy = strategy;
      return control(`update ${artifact} to ${version}`, "POST", `/api/slices/${enc(artifact)}/update`, body, btn);
    },
    ramp(btn) {
      const body = { to: numberOf("ramp-to"), seconds: numberOf("ramp-seconds") };
      return control(`ramp to ${body.to}/s over ${body.seconds} s`, "POST", "/api/load/ramp", body, btn);
    },
    "load-pause": (btn) => control("pause load", "POST", "/api/load/pause", {}, btn),
    "load-resume": (btn) => control("resume load", "POST", "/api/load/resume", {}, btn),
  };

  document.addEventListener("click", (e) => {
    const btn = e.target.closest("button[data-action]");
    if (!btn || btn.disabled) return;
    const act = ACTIONS[btn.dataset.action];
    if (act) act(btn);
  });
  byTestId("link-dst").addEventListener("change", (e) => (e.target.dataset.touched = "1"));

  // ---------------------------------------------------------------- start
  initCharts();
  poll();
})();

// helios-ray live page: polls /v1/helios/status and redraws in place (no reloads, no external files).
// The API key (when the server requires one) is asked for on a 401, kept in sessionStorage and sent as
// "Authorization: Bearer <key>".  Everything from the server is written with textContent, never as HTML.
"use strict";

(function () {
  const POLL_MS = 2000;
  const KEY = "helios-api-key";
  const SVG = "http://www.w3.org/2000/svg";
  const base = location.pathname.replace(/dashboard\/?$/, "");
  const statusUrl = base + "v1/helios/status";
  let timer = null;
  let lastEventsKey = "";

  const $ = (id) => document.getElementById(id);
  const setText = (id, v) => { const el = $(id); if (el) el.textContent = v == null ? "–" : String(v); };
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = String(text);
    return e;
  }
  function svgEl(tag, attrs, cls) {
    const e = document.createElementNS(SVG, tag);
    for (const k in attrs) e.setAttribute(k, String(attrs[k]));
    if (cls) e.setAttribute("class", cls);
    return e;
  }
  const fmtNum = (x, nd) => (x == null || Number.isNaN(x) ? "–" : Number(x).toFixed(nd == null ? 0 : nd));
  const fmtInt = (x) => (x == null ? "–" : Number(x).toLocaleString("en-US"));
  const fmtTime = (t) => (t == null ? "–" : new Date(t * 1000).toLocaleTimeString("en-GB", { hour12: false }));
  function ago(t, now) {
    if (t == null) return "–";
    const s = Math.max(0, Math.round(now - t));
    return s < 90 ? s + " s ago" : s < 5400 ? Math.round(s / 60) + " min ago" : Math.round(s / 3600) + " h ago";
  }
  const where = (p) => (p && p.model != null ? p.model + " @ " + p.depth : "–");

  // ------------------------------------------------------------------------------------------ polling
  function schedule(ms) { clearTimeout(timer); timer = setTimeout(poll, ms); }

  async function poll() {
    const headers = { Accept: "application/json" };
    const key = sessionStorage.getItem(KEY);
    if (key) headers.Authorization = "Bearer " + key;
    let resp;
    try {
      resp = await fetch(statusUrl, { headers: headers, cache: "no-store" });
    } catch (e) {
      conn("unreachable, retrying", false);
      schedule(POLL_MS * 2);
      return;
    }
    if (resp.status === 401) {
      if (key) sessionStorage.removeItem(KEY);
      askKey(key ? "The key was rejected; enter the API key again." : null);
      return;
    }
    if (!resp.ok) {
      conn("HTTP " + resp.status + ", retrying", false);
      schedule(POLL_MS * 2);
      return;
    }
    let doc;
    try {
      doc = await resp.json();
    } catch (e) {
      conn("bad response, retrying", false);
      schedule(POLL_MS * 2);
      return;
    }
    $("auth").hidden = true;
    $("main").hidden = false;
    render(doc);
    conn("updated " + new Date().toLocaleTimeString("en-GB", { hour12: false }), true);
    schedule(POLL_MS);
  }

  function conn(text, ok) {
    const c = $("conn");
    c.textContent = text;
    c.className = "conn " + (ok ? "ok" : "bad");
  }

  function askKey(msg) {
    clearTimeout(timer);
    conn("API key required", false);
    if (msg) setText("auth-msg", msg);
    $("main").hidden = true;
    $("auth").hidden = false;
    $("auth-key").focus();
  }

  $("auth-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const k = $("auth-key").value.trim();
    if (!k) return;
    sessionStorage.setItem(KEY, k);
    $("auth-key").value = "";
    conn("connecting…", true);
    poll();
  });

  // ------------------------------------------------------------------------------------------- render
  function render(doc) {
    const tl = doc.timeline || {};
    const now = tl.now || Date.now() / 1000;
    const ctl = doc.controller || {};
    setText("mode", doc.mode ? "mode " + doc.mode : "");
    setText("slo", doc.slo ? "SLO " + doc.slo : "");
    const open = !!(doc.access && doc.access.open_to_other_hosts);
    setText("access", open ? "no API key: open to every host" : "");
    $("access").hidden = !open;
    renderPlacement(doc, now);
    renderBreaches(ctl.breaches || {});
    renderQuality(doc);
    renderReplicas(doc.replicas || []);
    renderCharts(tl.series || []);
    renderExits(tl.exit_layers || {}, doc.replicas || [], doc.placement || {});
    renderEvents(tl.events || [], now);
  }

  function renderPlacement(doc, now) {
    const p = doc.placement || {};
    const reps = (doc.replicas || []).filter((r) => r.model === p.model && r.depth === p.depth);
    setText("placement-model", p.model);
    setText("placement-depth", p.depth);
    setText("placement-version", p.version);
    setText("placement-replicas", reps.length + " / " + (doc.replicas || []).length);
    setText("placement-changed", ago(doc.changed_at, now));
    setText("totals", fmtInt(doc.requests) + " requests · " + fmtInt(doc.tokens_observed) +
      " tokens observed · candidates: " + (doc.candidates || []).join(", "));
  }

  function renderBreaches(b) {
    setText("breach-count", b.breaches);
    setText("breach-limit", b.limit);
    const share = b.limit ? Math.min(1, (b.breaches || 0) / b.limit) : 0;
    const bar = $("breach-bar");
    bar.style.width = (100 * share).toFixed(1) + "%";
    bar.className = share >= 0.8 ? "hot" : "";
    $("breach-storm").hidden = !b.storm;
    setText("breach-detail", "confidence < " + fmtNum(b.threshold, 2) + " in the last " + fmtInt(b.tokens) +
      " of " + fmtInt(b.window) + " tokens · all-time " + fmtInt(b.total_breaches) + " / " + fmtInt(b.total_tokens));
  }

  // Per group and request class: the placement's measured quality against the class's floor, and the group's
  // share of that traffic - which placement serves which class, and why (quality first, then speed).
  function renderQuality(doc) {
    const q = doc.quality || {};
    const floors = q.floors || {};
    const names = Object.keys(floors).sort();
    setText("quality-floors", names.length
      ? "floors: " + names.map((c) => c + " ≥ " + fmtNum(floors[c].value, 3) + " (" + floors[c].source + ")").join(" · ") +
        (q.reference ? " · chat judged by " + q.reference : "")
      : "no quality floors (no placement has a measured quality record)");
    const body = $("quality-rows");
    body.replaceChildren();
    for (const g of doc.groups || []) {
      const gq = g.quality || {};
      const p = g.placement || {};
      const classes = gq.classes || {};
      for (const c of Object.keys(classes).sort()) {
        const v = classes[c];
        const tr = el("tr");
        tr.dataset.group = g.name;
        tr.dataset.cls = c;
        const meets = el("td", v.meets ? null : "bad", v.meets ? "yes" : "no");
        tr.append(el("td", null, g.name), el("td", null, p.model + " @ " + p.depth), el("td", null, c),
          el("td", null, v.value == null ? "–" : fmtNum(v.value, 3)),
          el("td", null, v.floor == null ? "–" : fmtNum(v.floor, 3)), meets,
          el("td", null, fmtNum(100 * (v.traffic_share || 0), 0) + "%"));
        body.append(tr);
      }
      if (gq.chat_capable === false) {
        const tr = el("tr");
        tr.append(el("td", null, g.name), el("td", null, p.model + " @ " + p.depth), el("td", null, "chats"),
          el("td", null, "–"), el("td", null, "–"), el("td", "bad", "not chat-capable"), el("td", null, "–"));
        body.append(tr);
      }
    }
    const below = ((doc.routing || {}).steering || {}).below_floor || {};
    const bk = Object.keys(below);
    setText("quality-below", bk.length ? "served below the floor (no placement met it): " +
      bk.map((k) => k + " " + below[k]).join(", ") : "");
  }

  function renderReplicas(reps) {
    const body = $("replica-rows");
    body.replaceChildren();
    if (!reps.length) {
      const tr = el("tr");
      const td = el("td", "empty", "no replica has reported yet");
      td.colSpan = 9;
      tr.append(td);
      body.append(tr);
      return;
    }
    for (const r of reps) {
      const tr = el("tr");
      tr.dataset.replica = r.replica;
      const kv = el("td");
      const meter = el("span", "kv");
      const fill = el("span");
      fill.style.width = (100 * (r.kv_blocks_used || 0) / Math.max(1, r.kv_blocks_total || 0)).toFixed(1) + "%";
      meter.append(fill);
      kv.append(meter, document.createTextNode(fmtInt(r.kv_blocks_used) + " / " + fmtInt(r.kv_blocks_total)));
      tr.append(el("td", null, String(r.replica).slice(-12)), el("td", null, r.pid),
        el("td", null, r.model + " @ " + r.depth + " / " + r.total_layers),
        el("td", null, r.placement_version == null ? "–" : r.placement_version),
        el("td", null, r.running), el("td", null, r.waiting), kv,
        el("td", null, fmtInt(r.tokens_out)), el("td", null, fmtInt(r.breaches)));
      body.append(tr);
    }
  }

  // ----------------------------------------------------------------------------------------- charts
  const W = 460, H = 160, L = 40, R = 8, T = 8, B = 20;

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function lineChart(svg, series, fmt) {
    svg.replaceChildren();
    const xs = series.length ? series[0].points.map((p) => p[0]) : [];
    if (!xs.length) return;
    const x0 = xs[0], x1 = xs[xs.length - 1] || x0 + 1;
    let ymax = 0;
    for (const s of series) for (const p of s.points) if (p[1] != null) ymax = Math.max(ymax, p[1]);
    ymax = niceMax(ymax);
    const sx = (x) => L + (W - L - R) * (x - x0) / Math.max(1e-9, x1 - x0);
    const sy = (y) => H - B - (H - T - B) * y / ymax;
    svg.append(svgEl("line", { x1: L, y1: H - B, x2: W - R, y2: H - B }, "axis"),
      svgEl("line", { x1: L, y1: T, x2: L, y2: H - B }, "axis"));
    for (const f of [0, 0.5, 1]) {
      const t = svgEl("text", { x: L - 4, y: sy(ymax * f) + 3, "text-anchor": "end" });
      t.textContent = fmt(ymax * f);
      svg.append(t);
    }
    const span = Math.round((x1 - x0) / 60);
    const lab = svgEl("text", { x: L, y: H - 4 });
    lab.textContent = "-" + span + " min";
    const lab2 = svgEl("text", { x: W - R, y: H - 4, "text-anchor": "end" });
    lab2.textContent = "now";
    svg.append(lab, lab2);
    for (const s of series) {
      let d = "", pen = false;
      for (const p of s.points) {
        if (p[1] == null) { pen = false; continue; }
        d += (pen ? "L" : "M") + sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1);
        pen = true;
      }
      if (d) svg.append(svgEl("path", { d: d }, s.cls));
      for (const p of s.points) if (p[1] != null) svg.append(svgEl("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 1.8 }, s.cls));
    }
  }

  function renderCharts(series) {
    const pts = (k) => series.map((b) => [b.t, b[k]]);
    lineChart($("chart-tps"), [{ cls: "s-tps", points: pts("tokens_per_s") }], (v) => fmtNum(v, v < 10 ? 1 : 0));
    lineChart($("chart-lat"), [{ cls: "s-ttft", points: pts("ttft_p50") }, { cls: "s-tpot", points: pts("tpot_p50") }],
      (v) => (v < 1 ? fmtNum(v * 1000, 0) + " ms" : fmtNum(v, 1) + " s"));
    // The last bucket is still filling: show the one before it as "now".
    const done = series.length > 1 ? series[series.length - 2] : series[0];
    setText("tps-now", done ? fmtNum(done.tokens_per_s, 1) + " tok/s" : "");
  }

  function renderExits(hists, reps, placement) {
    const box = $("exit-hists");
    box.replaceChildren();
    const models = Object.keys(hists).sort();
    if (!models.length) { box.append(el("p", "empty", "no tokens served yet")); return; }
    for (const m of models) {
      const counts = hists[m];
      const layers = Object.keys(counts).map(Number);
      const total = layers.reduce((a, l) => a + counts[l], 0);
      const rep = reps.find((r) => r.model === m);
      const maxLayer = Math.max(rep ? rep.total_layers : 0, ...layers);
      const div = el("div", "hist");
      div.dataset.model = m;
      div.append(el("h3", null, m + " · " + fmtInt(total) + " tokens"));
      const svg = svgEl("svg", { viewBox: "0 0 " + W + " 120", role: "img" }, "chart");
      const top = Math.max(...layers.map((l) => counts[l]));
      const bw = (W - L - R) / maxLayer;
      for (let l = 1; l <= maxLayer; l++) {
        const c = counts[l] || 0;
        const h = c ? Math.max(1, 90 * c / top) : 0;
        const cur = placement.model === m && placement.depth === l;
        const r = svgEl("rect", { x: L + (l - 1) * bw + 1, y: 100 - h, width: Math.max(1, bw - 2), height: h },
          "hbar" + (cur ? " cur" : ""));
        const tip = svgEl("title");
        tip.textContent = "layer " + l + ": " + fmtInt(c) + " tokens (" + fmtNum(100 * c / total, 1) + "%)";
        r.append(tip);
        svg.append(r);
        if (l === 1 || l % 5 === 0 || l === maxLayer) {
          const t = svgEl("text", { x: L + (l - 0.5) * bw, y: 114, "text-anchor": "middle" });
          t.textContent = String(l);
          svg.append(t);
        }
      }
      const yl = svgEl("text", { x: L - 4, y: 14, "text-anchor": "end" });
      yl.textContent = fmtNum(100 * top / total, 0) + "%";
      svg.append(yl);
      div.append(svg);
      box.append(div);
    }
  }

  function renderEvents(events, now) {
    const key = JSON.stringify(events.map((e) => [e.at, e.action]));
    if (key === lastEventsKey) {  // unchanged: keep the list (and its scroll position), refresh nothing
      return;
    }
    lastEventsKey = key;
    const ol = $("events");
    ol.replaceChildren();
    if (!events.length) { ol.append(el("li", "empty", "no decisions yet")); return; }
    for (const e of events.slice().reverse()) {
      const li = el("li");
      li.dataset.action = e.action;
      li.dataset.source = e.source;
      const moved = e.from && where(e.from) !== where(e.to);
      const move = moved ? where(e.from) + " → " + where(e.to) : where(e.to);
      li.append(el("span", "t", fmtTime(e.at)), el("span", "a a-" + e.action, e.action),
        el("span", "g", e.trigger || ""), el("span", "m", move), el("span", "r", e.reason || ""));
      li.title = e.reason || "";
      ol.append(li);
    }
  }

  poll();
})();

// The dashboard page: keeps the run's records in memory, follows the master's event stream and
// redraws (at most a few times a second) the header, the worker table, the charts and the timeline.
//
// Sync protocol (see hetero_ps/observe/dashboard/server.py): open /api/stream first; on its "hello" (and on
// "resync", when the server dropped messages for us) fetch /api/status, page through
// /api/metrics?since=<last step we hold> and fetch /api/events?since=<last seq>. Live messages that
// arrive during that fetch wait in `pending`, so a page boundary never skips steps; records we
// already hold are recognised by step number / event seq and ignored.
"use strict";

(function () {
  const MAX_STEPS = 10000;           // like the hub: the page never holds more than this many steps
  const RECENT = 20;                 // steps behind "current" throughput, loss and ETA
  const REDRAW_MS = 250;
  const STATUS_EVERY_MS = 5000;
  const PALETTE = ["#2f6fde", "#e8743b", "#19a979", "#945ecf", "#d64545", "#13a4b4", "#c98a00", "#ed4a7b",
                   "#6f7d8c", "#7aa329"];
  const PHASES = [["compute_s", "compute", "#2f6fde"], ["encode_s", "encode", "#945ecf"], ["push_s", "push", "#e8743b"],
                  ["wait_s", "wait", "#aab3bf"], ["pull_s", "pull", "#13a4b4"]];
  const { LineChart, StackedAreaChart, StackedBarChart, fmtSI, fmtSeconds, fmtPercent, trim } = window.Charts;

  const S = { steps: [], lastStep: -1, epochs: new Map(), events: [], lastSeq: -1, workers: [], status: null,
              started: null };
  let syncing = false, syncAgain = false, pending = [], redrawTimer = null, renderedEvents = -1, jobKey = "";

  const $ = (id) => document.getElementById(id);
  const color = (rank) => PALETTE[((+rank % PALETTE.length) + PALETTE.length) % PALETTE.length];
  const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v; else if (k === "style") e.style.cssText = v; else e.setAttribute(k, v);
    }
    for (const c of children) if (c != null) e.append(c instanceof Node ? c : String(c));
    return e;
  }

  const charts = {
    loss: new LineChart($("chart-loss"), { legend: $("legend-loss"), format: trim }),
    accuracy: new LineChart($("chart-accuracy"), { legend: $("legend-accuracy"), format: fmtPercent, xLabel: "step" }),
    throughput: new LineChart($("chart-throughput"), { legend: $("legend-throughput"), format: (v) => fmtSI(v), yMin: 0 }),
    shares: new StackedAreaChart($("chart-shares"), { legend: $("legend-shares"), format: fmtPercent, yMax: 100 }),
    split: new StackedBarChart($("chart-split"), { legend: $("legend-split"), format: fmtSeconds }),
    bytes: new LineChart($("chart-bytes"), { legend: $("legend-bytes"), format: (v) => fmtSI(v, "B/s"), yMin: 0 }),
  };

  // -- records ---------------------------------------------------------------------------------
  function addStep(rec) {
    if (typeof rec.step !== "number" || rec.step <= S.lastStep) return;
    S.steps.push(rec);
    S.lastStep = rec.step;
    if (S.steps.length > MAX_STEPS * 1.1) S.steps.splice(0, S.steps.length - MAX_STEPS);
  }
  function addEpoch(rec) { S.epochs.set(rec.epoch, rec); }
  function addEvent(rec) {
    if (typeof rec.seq !== "number" || rec.seq <= S.lastSeq) return;
    S.events.push(rec);
    S.lastSeq = rec.seq;
    if (S.events.length > 6000) S.events.splice(0, S.events.length - 5000);
  }
  function setStatus(st) {
    // A different run (the master restarted) starts from scratch.
    if (S.started != null && st.started !== S.started) {
      Object.assign(S, { steps: [], lastStep: -1, epochs: new Map(), events: [], lastSeq: -1 });
      renderedEvents = -1;
    }
    S.started = st.started;
    S.status = st;
    S.workers = st.workers || [];
  }

  async function getJSON(url) {
    const r = await fetch(url, { cache: "no-store" });
    if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
    return r.json();
  }

  async function sync() {
    if (syncing) { syncAgain = true; return; }
    syncing = true;
    try {
      do {
        syncAgain = false;
        setStatus(await getJSON("/api/status"));
        for (let more = true; more;) {
          const m = await getJSON(`/api/metrics?since=${S.lastStep}&limit=2000`);
          m.steps.forEach(addStep);
          m.epochs.forEach(addEpoch);
          more = m.more && m.steps.length > 0;
        }
        (await getJSON(`/api/events?since=${S.lastSeq}`)).events.forEach(addEvent);
      } while (syncAgain);
      document.body.dataset.ready = "1";
    } catch (err) {
      console.warn("dashboard sync failed:", err);
    } finally {
      syncing = false;
      const queued = pending;
      pending = [];
      queued.forEach(([kind, data]) => apply(kind, data));
      redraw();
    }
  }

  function apply(kind, data) {
    if (syncing) { pending.push([kind, data]); return; }
    if (kind === "step") addStep(data);
    else if (kind === "epoch") addEpoch(data);
    else if (kind === "event") addEvent(data);
    else if (kind === "workers") S.workers = data;
    else if (kind === "status") setStatus(data);
    redraw();
  }

  function connect() {
    const es = new EventSource("/api/stream");
    const conn = $("conn");
    const setConn = (cls, text) => { conn.className = "conn " + cls; conn.lastChild.textContent = text; };
    es.onopen = () => setConn("live", "live");
    es.onerror = () => setConn(es.readyState === EventSource.CLOSED ? "down" : "",
                               es.readyState === EventSource.CLOSED ? "disconnected" : "reconnecting");
    es.addEventListener("hello", (e) => { setStatus(JSON.parse(e.data)); sync(); });
    es.addEventListener("resync", () => sync());
    for (const kind of ["step", "epoch", "event", "workers", "status"]) {
      es.addEventListener(kind, (e) => apply(kind, JSON.parse(e.data)));
    }
  }

  async function refreshStatus() {
    if (!syncing && S.status) {
      try { setStatus(await getJSON("/api/status")); redraw(); } catch (err) { /* the stream reports outages */ }
    }
  }

  // -- rendering ---------------------------------------------------------------------------------
  function redraw() {
    if (redrawTimer == null) redrawTimer = setTimeout(() => { redrawTimer = null; render(); }, REDRAW_MS);
  }

  function render() {
    const recent = S.steps.slice(-RECENT);
    renderHeader(recent);
    renderWorkers();
    renderCharts();
    renderTimeline();
    document.body.dataset.steps = String(S.steps.length);
  }

  function fmtDuration(s) {
    if (s == null || !isFinite(s)) return "—";
    s = Math.round(s);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    if (h) return `${h}h ${String(m).padStart(2, "0")}m`;
    if (m) return `${m}m ${String(sec).padStart(2, "0")}s`;
    return `${sec} s`;
  }
  const sum = (xs, f) => xs.reduce((a, x) => a + (f(x) || 0), 0);
  const workersOf = (rec) => Object.entries(rec.workers || {});

  function renderHeader(recent) {
    const st = S.status || {};
    const job = st.job || {};
    const state = st.state || (S.steps.length ? "training" : "waiting");
    $("experiment").textContent = job.experiment || job.name || "unnamed run";
    const brief = [job.model && job.dataset ? `${job.model} on ${job.dataset}` : job.model,
                   job.global_batch != null ? `global batch ${job.global_batch}` : null, job.sync,
                   job.load_balancing ? `load balancing: ${job.policy}` : (job.policy ? "static split" : null),
                   job.compression && job.compression !== "none" ? `push ${job.compression}` : null];
    $("job-brief").textContent = brief.filter(Boolean).join(" · ");
    const badge = $("state");
    badge.textContent = state;
    badge.className = "badge state-" + state;

    const last = S.steps[S.steps.length - 1];
    const done = last ? last.step + 1 : 0;
    const total = job.total_steps;
    const rTime = sum(recent, (r) => r.step_s);
    const rSamples = sum(recent, (r) => r.samples);
    const sps = rTime > 0 ? rSamples / rTime : null;
    const eta = state === "finished" ? 0 : total && recent.length && rTime > 0 ? (total - done) * rTime / recent.length : null;
    $("progress-bar").style.width = total ? Math.min(100, (100 * done) / total).toFixed(1) + "%" : (state === "finished" ? "100%" : "0");
    const parts = [];
    if (last) {
      parts.push(total ? `step ${done} / ${total}` : `step ${done}`);
      parts.push(job.epochs ? `epoch ${last.epoch + 1} / ${job.epochs}` : `epoch ${last.epoch + 1}`);
      if (total) parts.push(`${((100 * done) / total).toFixed(1)} %`);
      if (state === "finished") parts.push("finished"); else if (eta != null) parts.push(`ETA ${fmtDuration(eta)}`);
    }
    $("progress-text").textContent = parts.length ? parts.join(" · ") : "waiting for the first step…";

    $("stat-loss").textContent = last && last.loss != null ? trim(last.loss) : "—";
    const lossMean = recent.length ? sum(recent, (r) => r.loss) / recent.length : null;
    $("stat-loss-sub").textContent = lossMean != null ? `mean of last ${recent.length}: ${trim(lossMean)}` : "";

    const epochs = [...S.epochs.values()].sort((a, b) => a.epoch - b.epoch);
    const le = epochs[epochs.length - 1];
    $("stat-acc").textContent = le ? (le.eval_accuracy != null ? fmtPercent(100 * le.eval_accuracy) : "n/a") : "—";
    $("stat-acc-sub").textContent = le ? `epoch ${le.epoch + 1}, eval loss ${trim(le.eval_loss)}` : "after the first epoch";

    const totals = st.totals || {};
    const ideal = totals.ideal_samples_per_s;
    $("stat-sps").textContent = sps != null ? fmtSI(sps, "/s") : "—";
    $("stat-sps-sub").textContent = ideal ? `${sps ? fmtPercent((100 * sps) / ideal) : "—"} of ideal ${fmtSI(ideal, "/s")}`
      : "samples/s, last " + RECENT + " steps";

    // Communication overhead as in summary.json: 1 − Σ slowest compute / Σ step time.
    const allTime = sum(S.steps, (r) => r.step_s);
    const slowest = sum(S.steps, (r) => Math.max(0, ...workersOf(r).map(([, w]) => w.compute_s || 0)));
    $("stat-comm").textContent = allTime > 0 ? fmtPercent(100 * (1 - slowest / allTime)) : "—";

    const up = sum(recent, (r) => sum(workersOf(r), ([, w]) => w.bytes_out));
    const down = sum(recent, (r) => sum(workersOf(r), ([, w]) => w.bytes_in));
    $("stat-net").textContent = rTime > 0 ? `↑ ${fmtSI(up / rTime, "B/s")}` : "—";
    $("stat-net-sub").textContent = rTime > 0 ? `↓ ${fmtSI(down / rTime, "B/s")} · total ↑ ${fmtSI(totals.bytes_out || 0, "B")} ↓ ${fmtSI(totals.bytes_in || 0, "B")}` : "";

    $("stat-step").textContent = recent.length ? fmtSeconds(rTime / recent.length) : "—";
    const sv = last && last.server;
    $("stat-step-sub").textContent = sv ? `server: update ${fmtSeconds(sv.optimizer_s)}, send ${fmtSeconds(sv.broadcast_s)}` : "";

    const key = JSON.stringify(job);
    if (key !== jobKey) {
      jobKey = key;
      $("job").replaceChildren(...Object.entries(job).flatMap(([k, v]) =>
        [el("dt", {}, k), el("dd", {}, typeof v === "object" && v !== null ? JSON.stringify(v) : String(v))]));
    }
  }

  function renderWorkers() {
    const rows = S.workers.slice().sort((a, b) => a.rank - b.rank);
    const dash = (v, f) => (v == null ? "—" : f ? f(v) : String(v));
    const tbody = $("workers").tBodies[0];
    tbody.replaceChildren(...rows.map((w) => {
      const share = w.share == null ? null : 100 * w.share;
      return el("tr", { "data-rank": w.rank, class: w.status === "lost" || w.status === "suspended" ? "lost" : "" },
        el("td", {}, el("span", { class: "rank-dot", style: `background:${color(w.rank)}` }), String(w.rank)),
        el("td", { class: "host", title: w.host || "" }, dash(w.host)),
        el("td", {}, dash(w.device)),
        el("td", {}, el("span", { class: "badge st-" + (w.status || "joined") }, w.status || "joined")),
        el("td", { class: "num" }, dash(w.batch)),
        el("td", {}, share == null ? "—" : el("span", { class: "share" },
          el("span", { class: "track" }, el("span", { class: "fill", style: `display:block;width:${Math.min(100, share)}%;background:${color(w.rank)}` })),
          fmtPercent(share))),
        el("td", { class: "num" }, dash(w.samples_per_s, (v) => fmtSI(v))),
        el("td", { class: "num" }, dash(w.staleness)),
        el("td", { class: "num" }, dash(w.cpu_util, (v) => fmtPercent(v))),
        el("td", { class: "num" }, dash(w.mem_bytes, (v) => fmtSI(v, "B"))),
        el("td", { class: "num" }, dash(w.gpu_util, (v) => fmtPercent(v))),
        el("td", { class: "num" }, dash(w.gpu_mem_bytes, (v) => fmtSI(v, "B"))));
    }));
    $("workers-empty").hidden = rows.length > 0;
  }

  function ranksOf(steps) {
    const set = new Set();
    for (const r of steps) for (const k of Object.keys(r.workers || {})) set.add(+k);
    for (const w of S.workers) set.add(+w.rank);
    return [...set].sort((a, b) => a - b);
  }

  function renderCharts() {
    const steps = S.steps;
    const ranks = ranksOf(steps);
    const xs = steps.map((r) => r.step);
    const epochs = [...S.epochs.values()].sort((a, b) => a.step - b.step);

    charts.loss.setData([
      { name: "train loss", color: css("--accent"), points: steps.map((r) => [r.step, r.loss]) },
      { name: "eval loss", color: "#e8743b", markers: true, points: epochs.map((e) => [e.step, e.eval_loss]) },
    ]);
    charts.accuracy.setData([{ name: "eval accuracy", color: "#19a979", markers: true,
      points: epochs.filter((e) => e.eval_accuracy != null).map((e) => [e.step, 100 * e.eval_accuracy]) }]);

    const ideal = S.status && S.status.totals ? S.status.totals.ideal_samples_per_s : null;
    const tp = ranks.map((rank) => ({ name: `rank ${rank}`, color: color(rank), width: 1.2,
      points: steps.map((r) => { const w = (r.workers || {})[rank]; return [r.step, w && r.step_s > 0 ? w.batch / r.step_s : null]; }) }));
    tp.push({ name: "total", color: css("--text"), width: 2, points: steps.map((r) => [r.step, r.samples_per_s]) });
    if (ideal && steps.length) tp.push({ name: "ideal", color: css("--muted"), dash: true, width: 1.5,
                                         points: [[xs[0], ideal], [xs[xs.length - 1], ideal]] });
    charts.throughput.setData(tp);

    charts.shares.setData({ x: xs, series: ranks.map((rank) => ({ name: `rank ${rank}`, color: color(rank),
      values: steps.map((r) => { const w = (r.workers || {})[rank]; return w && r.samples ? (100 * w.batch) / r.samples : 0; }) })) });

    const sel = $("split-worker");
    const want = ["mean", ...ranks.map(String)];
    if ([...sel.options].map((o) => o.value).join() !== want.join()) {
      const keep = sel.value;
      sel.replaceChildren(el("option", { value: "mean" }, "mean of workers"), ...ranks.map((r) => el("option", { value: r }, `rank ${r}`)));
      sel.value = want.includes(keep) ? keep : "mean";
    }
    const pick = sel.value;
    charts.split.setData({ x: xs, series: PHASES.map(([key, name, c]) => ({ name, color: c, values: steps.map((r) => {
      const ws = workersOf(r).filter(([k]) => pick === "mean" || k === pick).map(([, w]) => w[key] || 0);
      return ws.length ? ws.reduce((a, b) => a + b, 0) / ws.length : 0;
    }) })) });

    charts.bytes.setData([
      { name: "workers → server (gradients)", color: "#e8743b", points: steps.map((r) => [r.step, r.step_s > 0 ? sum(workersOf(r), ([, w]) => w.bytes_out) / r.step_s : null]) },
      { name: "server → workers (parameters)", color: "#13a4b4", points: steps.map((r) => [r.step, r.step_s > 0 ? sum(workersOf(r), ([, w]) => w.bytes_in) / r.step_s : null]) },
    ]);
    for (const c of Object.values(charts)) c.draw();
  }

  function describeEvent(e, previousSizes) {
    const what = el("div", { class: "what" });
    if (e.event === "schedule") {
      const chips = el("div", { class: "chips" });
      for (const [rank, b] of Object.entries(e.sizes || {}).sort((a, b) => a[0] - b[0])) {
        const prev = previousSizes ? previousSizes[rank] : undefined;
        const chip = el("span", { class: "chip" }, el("span", { class: "rank-dot", style: `background:${color(rank)}` }), `rank ${rank}: `);
        if (prev != null && prev !== b) chip.append(`${prev} → `, el("b", { class: b > prev ? "up" : "down" }, String(b)));
        else chip.append(el("b", {}, String(b)));
        chips.append(chip);
      }
      what.append(chips);
      const pred = e.predicted_step_s != null
        ? ` Predicted step ${e.previous_predicted_s != null ? fmtSeconds(e.previous_predicted_s) + " → " : ""}${fmtSeconds(e.predicted_step_s)}.` : "";
      const reason = (e.reason || "").trim();
      const sep = reason && !/[.!?]$/.test(reason) && pred ? "." : "";
      what.append(el("div", { class: "reason" }, `${e.policy ? e.policy + ": " : ""}${reason}${sep}${pred}`));
    } else if (e.event === "worker_joined") {
      what.append(`rank ${e.rank} joined from ${e.host || "?"} (${e.device || "?"})`);
    } else if (e.event === "worker_lost") {
      what.append(`rank ${e.rank}${e.host ? " on " + e.host : ""} lost`, el("div", { class: "reason" }, e.reason || ""));
    } else if (e.event === "worker_suspended") {
      what.append(`rank ${e.rank} suspended: no answer after ${fmtSeconds(e.waited_s)}`,
        el("div", { class: "reason" }, `limit ${fmtSeconds(e.limit_s)}; its samples were redone by the others`));
    } else if (e.event === "worker_resumed") {
      what.append(`rank ${e.rank} answers again: back at work`);
    } else if (e.event === "worker_role") {
      what.append(e.role === "standby" ? `rank ${e.rank} stands by: waiting for it would slow every step`
        : `rank ${e.rank} is back in the steps`, el("div", { class: "reason" }, e.reason || ""));
    } else if (e.event === "codec_choice") {
      what.append(`rank ${e.rank} now pushes ${e.push} and pulls ${e.pull}`, el("div", { class: "reason" }, e.reason || ""));
    } else if (e.event === "nonfinite_gradient") {
      what.append("non-finite gradient: step skipped", el("div", { class: "reason" }, (e.workers || []).join(", ")));
    } else {
      const rest = Object.fromEntries(Object.entries(e).filter(([k]) => !["event", "step", "t", "seq"].includes(k)));
      what.append(el("div", { class: "reason" }, JSON.stringify(rest)));
    }
    return what;
  }

  // Newest first. Consecutive decisions that keep the same split are folded into one entry ("×N").
  function renderTimeline() {
    if (renderedEvents === S.lastSeq) return;
    renderedEvents = S.lastSeq;
    const groups = [];
    let prevSizes = null;
    for (const e of S.events) {
      const last = groups[groups.length - 1];
      const same = e.event === "schedule" && last && last.first.event === "schedule" &&
                   JSON.stringify(last.first.sizes) === JSON.stringify(e.sizes);
      if (same) { last.count++; last.lastStep = e.step; last.latest = e; continue; }
      groups.push({ first: e, latest: e, count: 1, lastStep: e.step, prevSizes });
      if (e.event === "schedule") prevSizes = e.sizes;
    }
    const items = groups.slice(-300).reverse().map((g) => {
      const e = g.first, kind = String(e.event || "event");
      const when = e.t ? new Date(e.t * 1000).toLocaleTimeString() : "";
      const steps = g.count > 1 ? `steps ${e.step}–${g.lastStep}` : `step ${e.step ?? "—"}`;
      const what = describeEvent(e, g.prevSizes);
      if (g.count > 1) what.append(el("div", { class: "reason" }, `kept ${g.count - 1} more time${g.count > 2 ? "s" : ""} (latest: ${g.latest.reason || "no reason given"})`));
      return el("li", { "data-event": kind, "data-count": g.count },
        el("span", { class: "when" }, steps, el("br"), when),
        el("span", { class: "kind " + kind }, kind.replace(/_/g, " ")),
        what);
    });
    $("timeline").replaceChildren(...items);
    $("timeline-empty").hidden = items.length > 0;
    const n = S.events.filter((e) => e.event === "schedule").length;
    $("events-count").textContent = S.events.length ? `${n} decision${n === 1 ? "" : "s"}, ${S.events.length} events` : "";
  }

  $("split-worker").addEventListener("change", () => render());
  window.addEventListener("resize", () => redraw());
  setInterval(refreshStatus, STATUS_EVERY_MS);
  connect();
})();

// A small canvas chart module for the dashboard: line charts, stacked areas and stacked bars over a
// numeric x axis (the step). No dependencies. Every chart:
//   - takes its data with setData(...) and draws on draw(); the page throttles draws;
//   - renders its legend into a DOM element (crisp text, wraps on its own) and a hover read-out;
//   - reduces the data to about one point (lines, areas) or one bar per few pixels before drawing,
//     so 10,000 steps cost no more to draw than 500;
//   - sets canvas.dataset.points to the number of data points it holds (tests read it).
"use strict";

(function (global) {
  const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

  // Axis ticks at 1, 2 or 5 × 10^k, about `count` of them, covering [lo, hi].
  function niceTicks(lo, hi, count) {
    if (!(hi > lo)) { hi = lo + 1; }
    const raw = (hi - lo) / Math.max(1, count);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
    const ticks = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(+v.toPrecision(12));
    return { ticks, step, lo: Math.floor(lo / step) * step, hi: Math.ceil(hi / step) * step };
  }

  // Number formatters the page passes as opts.format.
  const SI = [[1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]];
  function fmtSI(v, unit) {
    if (v == null || !isFinite(v)) return "—";
    const a = Math.abs(v);
    for (const [m, s] of SI) if (a >= m) return trim(v / m) + " " + s + (unit || "");
    return trim(v) + (unit ? " " + unit : "");
  }
  // About three significant digits, without trailing zeros: 1234 → "1234", 12.5 → "12.5", 0.0431 → "0.043".
  function trim(v) {
    const a = Math.abs(v);
    const s = a >= 100 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : a >= 1 ? v.toFixed(2) : a === 0 ? "0" : v.toPrecision(2);
    return s.includes(".") && !s.includes("e") ? s.replace(/\.?0+$/, "") : s;
  }
  function fmtSeconds(v) {
    if (v == null || !isFinite(v)) return "—";
    const a = Math.abs(v);
    if (a === 0) return "0";
    if (a < 1e-3) return trim(v * 1e6) + " µs";
    if (a < 1) return trim(v * 1e3) + " ms";
    return trim(v) + " s";
  }
  const fmtPercent = (v) => (v == null || !isFinite(v) ? "—" : trim(v) + " %");

  class Chart {
    // opts: {legend: Element, format: fn(y) → text, yMin, yMax, xLabel}
    constructor(canvas, opts) {
      this.canvas = canvas;
      this.opts = Object.assign({ format: (v) => fmtSI(v), xLabel: "step" }, opts || {});
      this.series = [];     // [{key, name, color, dash?, ...}]
      this.hoverX = null;
      this.tip = document.createElement("div");
      this.tip.className = "chart-tip";
      this.tip.hidden = true;
      canvas.parentElement.appendChild(this.tip);
      canvas.addEventListener("mousemove", (e) => this._hover(e));
      canvas.addEventListener("mouseleave", () => { this.hoverX = null; this.tip.hidden = true; this.draw(); });
      this.canvas.dataset.points = "0";
    }

    // Size the backing store to the element (sharp on high-DPI screens); returns the drawing context.
    _context() {
      const dpr = global.devicePixelRatio || 1;
      const w = Math.max(50, this.canvas.clientWidth), h = Math.max(50, this.canvas.clientHeight);
      if (this.canvas.width !== Math.round(w * dpr) || this.canvas.height !== Math.round(h * dpr)) {
        this.canvas.width = Math.round(w * dpr);
        this.canvas.height = Math.round(h * dpr);
      }
      const ctx = this.canvas.getContext("2d");
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.clearRect(0, 0, w, h);
      ctx.font = "11px system-ui, -apple-system, 'Segoe UI', sans-serif";
      return { ctx, w, h };
    }

    // Frame: axes, grid and tick labels for x in [x0, x1], y in [y0, y1]; returns the mapping.
    _frame(ctx, w, h, x0, x1, y0, y1) {
      const yt = niceTicks(y0, y1, Math.max(2, Math.floor(h / 45)));
      if (this.opts.yMax == null) y1 = yt.hi;
      if (this.opts.yMin == null) y0 = yt.lo;
      yt.ticks = [];
      for (let v = Math.ceil(y0 / yt.step - 1e-9) * yt.step; v <= y1 + yt.step * 1e-9; v += yt.step) yt.ticks.push(+v.toPrecision(12));
      const labels = yt.ticks.map((v) => this.opts.format(v));
      const left = 10 + Math.max(...labels.map((s) => ctx.measureText(s).width), 20);
      const box = { l: left, r: w - 12, t: 10, b: h - 24 };
      const X = (x) => box.l + ((x - x0) / (x1 - x0 || 1)) * (box.r - box.l);
      const Y = (y) => box.b - ((y - y0) / (y1 - y0 || 1)) * (box.b - box.t);
      ctx.strokeStyle = css("--grid");
      ctx.fillStyle = css("--muted");
      ctx.lineWidth = 1;
      ctx.textAlign = "right";
      ctx.textBaseline = "middle";
      yt.ticks.forEach((v, i) => {
        if (v < y0 - 1e-12 || v > y1 + 1e-12) return;
        const y = Math.round(Y(v)) + 0.5;
        ctx.beginPath(); ctx.moveTo(box.l, y); ctx.lineTo(box.r, y); ctx.stroke();
        ctx.fillText(labels[i], box.l - 6, y);
      });
      const xt = niceTicks(x0, x1, Math.max(2, Math.floor((box.r - box.l) / 80)));
      ctx.textAlign = "center";
      ctx.textBaseline = "top";
      xt.ticks.forEach((v) => {
        if (v < x0 || v > x1 || (xt.step < 1 && v % 1)) return;
        ctx.fillText(String(v), X(v), box.b + 6);
      });
      ctx.strokeStyle = css("--axis");
      ctx.beginPath(); ctx.moveTo(box.l, box.t); ctx.lineTo(box.l, box.b + 0.5); ctx.lineTo(box.r, box.b + 0.5); ctx.stroke();
      return { box, X, Y, x0, x1, y0, y1 };
    }

    _empty(ctx, w, h, text) {
      ctx.fillStyle = css("--muted");
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.fillText(text || "waiting for data…", w / 2, h / 2);
    }

    _legend(items) {
      const el = this.opts.legend;
      if (!el) return;
      const key = JSON.stringify(items.map((s) => [s.name, s.color, !!s.dash]));
      if (el.dataset.key === key) return;
      el.dataset.key = key;
      el.replaceChildren(...items.map((s) => {
        const span = document.createElement("span");
        const sw = document.createElement("i");
        sw.style.background = s.dash ? "transparent" : s.color;
        sw.style.borderColor = s.color;
        if (s.dash) sw.className = "dash";
        span.append(sw, document.createTextNode(s.name));
        return span;
      }));
    }

    _hover(e) {
      if (!this.map) return;
      const r = this.canvas.getBoundingClientRect();
      const px = e.clientX - r.left;
      const { box, x0, x1 } = this.map;
      if (px < box.l || px > box.r) { this.hoverX = null; this.tip.hidden = true; this.draw(); return; }
      this.hoverX = x0 + ((px - box.l) / (box.r - box.l)) * (x1 - x0);
      this.draw();
      const rows = this.valuesAt(this.hoverX);
      if (!rows) { this.tip.hidden = true; return; }
      this.tip.replaceChildren();
      const head = document.createElement("b");
      head.textContent = `${this.opts.xLabel} ${rows.x}`;
      this.tip.append(head);
      for (const row of rows.values) {
        const d = document.createElement("div");
        const sw = document.createElement("i");
        sw.style.background = row.color;
        d.append(sw, document.createTextNode(`${row.name}: ${this.opts.format(row.value)}`));
        this.tip.append(d);
      }
      this.tip.hidden = false;
      const left = Math.min(px + 14, this.canvas.clientWidth - this.tip.offsetWidth - 4);
      this.tip.style.left = Math.max(0, left) + "px";
      this.tip.style.top = "8px";
    }

    _crosshair(ctx) {
      if (this.hoverX == null || !this.map) return;
      const { box, X } = this.map;
      const x = Math.round(X(this.hoverX)) + 0.5;
      ctx.strokeStyle = css("--axis");
      ctx.setLineDash([3, 3]);
      ctx.beginPath(); ctx.moveTo(x, box.t); ctx.lineTo(x, box.b); ctx.stroke();
      ctx.setLineDash([]);
    }
  }

  // Lines: series = [{name, color, dash, points: [[x, y|null], ...] sorted by x}].
  class LineChart extends Chart {
    setData(series) { this.series = series; }

    draw() {
      const { ctx, w, h } = this._context();
      const all = this.series.filter((s) => s.points.length);
      this._legend(this.series);
      let n = 0, x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
      for (const s of all) {
        n += s.points.length;
        for (const [x, y] of s.points) {
          if (x < x0) x0 = x; if (x > x1) x1 = x;
          if (y != null) { if (y < y0) y0 = y; if (y > y1) y1 = y; }
        }
      }
      this.canvas.dataset.points = String(n);
      if (!n || y0 === Infinity) { this.map = null; return this._empty(ctx, w, h); }
      if (x1 === x0) x1 = x0 + 1;
      if (this.opts.yMin != null) y0 = Math.min(y0, this.opts.yMin);
      if (this.opts.yMax != null) y1 = Math.max(y1, this.opts.yMax);
      if (y1 === y0) { y1 += Math.abs(y1) * 0.1 || 1; if (this.opts.yMin == null) y0 -= Math.abs(y0) * 0.1 || 1; }
      this.map = this._frame(ctx, w, h, x0, x1, y0, y1);
      const { X, Y, box } = this.map;
      ctx.save();
      ctx.beginPath(); ctx.rect(box.l, box.t - 2, box.r - box.l, box.b - box.t + 4); ctx.clip();
      for (const s of all) {
        ctx.strokeStyle = s.color;
        ctx.lineWidth = s.width || 1.6;
        ctx.setLineDash(s.dash ? [6, 4] : []);
        ctx.lineJoin = "round";
        ctx.beginPath();
        let pen = false;
        for (const [x, y] of reduceLine(s.points, X, Y)) {
          if (y == null) { pen = false; continue; }
          if (pen) ctx.lineTo(x, y); else { ctx.moveTo(x, y); pen = true; }
        }
        ctx.stroke();
        if (s.markers || s.points.length === 1) {
          ctx.fillStyle = s.color;
          for (const [x, y] of s.points) if (y != null) { ctx.beginPath(); ctx.arc(X(x), Y(y), 2.5, 0, 7); ctx.fill(); }
        }
      }
      ctx.restore();
      this._crosshair(ctx);
    }

    valuesAt(x) {
      const values = [];
      let at = null;
      for (const s of this.series) {
        const p = nearest(s.points, x);
        if (!p || p[1] == null) continue;
        if (at == null || Math.abs(p[0] - x) < Math.abs(at - x)) at = p[0];
        values.push({ name: s.name, color: s.color, value: p[1] });
      }
      return values.length ? { x: at, values } : null;
    }
  }

  // Stacked series over a shared x grid: data = {x: [...], series: [{name, color, values: [...]}]}.
  class Stacked extends Chart {
    setData(data) { this.data = data; this.series = data.series; }

    // Average consecutive samples into at most `max` buckets (keeps the stacked total honest).
    _buckets(max) {
      const { x, series } = this.data;
      const k = Math.max(1, Math.ceil(x.length / max));
      const bx = [], bv = series.map(() => []);
      for (let i = 0; i < x.length; i += k) {
        const j = Math.min(x.length, i + k);
        bx.push(x[i]);
        series.forEach((s, si) => {
          let sum = 0, c = 0;
          for (let t = i; t < j; t++) if (s.values[t] != null) { sum += s.values[t]; c++; }
          bv[si].push(c ? sum / c : 0);
        });
      }
      return { x: bx, v: bv, k };
    }

    draw() {
      const { ctx, w, h } = this._context();
      this._legend(this.series);
      const n = this.data ? this.data.x.length : 0;
      this.canvas.dataset.points = String(n * (this.series.length ? 1 : 0));
      if (!n || !this.series.length) { this.map = null; return this._empty(ctx, w, h); }
      const b = this._buckets(Math.max(10, Math.floor((w - 60) / this.pxPerBucket)));
      let top = 0;
      for (let i = 0; i < b.x.length; i++) top = Math.max(top, b.v.reduce((a, vs) => a + vs[i], 0));
      const x0 = this.data.x[0], x1 = this._xEnd(b);
      this.map = this._frame(ctx, w, h, x0, x1 === x0 ? x0 + 1 : x1, 0, this.opts.yMax != null ? this.opts.yMax : top || 1);
      this._paint(ctx, b);
      this._crosshair(ctx);
    }

    valuesAt(x) {
      const { x: xs, series } = this.data || { x: [] };
      if (!xs.length) return null;
      const i = nearestIndex(xs, x);
      return { x: xs[i], values: series.map((s) => ({ name: s.name, color: s.color, value: s.values[i] })).reverse() };
    }
  }

  class StackedAreaChart extends Stacked {
    get pxPerBucket() { return 2; }
    _xEnd(b) { return this.data.x[this.data.x.length - 1]; }
    _paint(ctx, b) {
      const { X, Y } = this.map;
      const base = b.x.map(() => 0);
      b.v.forEach((vals, si) => {
        const topv = vals.map((v, i) => base[i] + v);
        ctx.beginPath();
        b.x.forEach((x, i) => (i ? ctx.lineTo(X(x), Y(topv[i])) : ctx.moveTo(X(x), Y(topv[i]))));
        if (b.x.length === 1) ctx.lineTo(X(b.x[0]) + 4, Y(topv[0]));
        for (let i = b.x.length - 1; i >= 0; i--) ctx.lineTo(X(b.x[i]) + (b.x.length === 1 ? 4 : 0), Y(base[i]));
        ctx.closePath();
        ctx.fillStyle = this.series[si].color;
        ctx.globalAlpha = 0.85;
        ctx.fill();
        ctx.globalAlpha = 1;
        topv.forEach((v, i) => (base[i] = v));
      });
    }
  }

  class StackedBarChart extends Stacked {
    get pxPerBucket() { return 4; }
    // Bars are centred on their x; leave room for the last one.
    _xEnd(b) { const xs = this.data.x; return xs[xs.length - 1] + (xs.length > 1 ? (xs[1] - xs[0]) * b.k : 1); }
    _paint(ctx, b) {
      const { X, Y } = this.map;
      const step = b.x.length > 1 ? X(b.x[1]) - X(b.x[0]) : X(b.x[0] + 1) - X(b.x[0]);
      const bw = Math.max(1, step * (step > 6 ? 0.75 : 1));
      b.x.forEach((x, i) => {
        let acc = 0;
        b.v.forEach((vals, si) => {
          const v = vals[i];
          if (!v) return;
          const y0 = Y(acc), y1 = Y(acc + v);
          ctx.fillStyle = this.series[si].color;
          ctx.fillRect(X(x), y1, bw, y0 - y1);
          acc += v;
        });
      });
    }
  }

  // For a line, keep per pixel column the first, min, max and last point: the drawn shape is the same.
  function reduceLine(points, X, Y) {
    const out = [];
    let col = null, first, lo, hi, last;
    const flush = () => {
      if (col == null) return;
      const seq = lo[0] <= hi[0] ? [first, lo, hi, last] : [first, hi, lo, last];
      let prev = null;
      for (const p of seq) if (p !== prev) { out.push([X(p[0]), Y(p[1])]); prev = p; }
    };
    for (const p of points) {
      if (p[1] == null) { flush(); col = null; out.push([0, null]); continue; }
      const c = Math.floor(X(p[0]));
      if (c !== col) { flush(); col = c; first = lo = hi = last = p; continue; }
      if (p[1] < lo[1]) lo = p;
      if (p[1] > hi[1]) hi = p;
      last = p;
    }
    flush();
    return out;
  }

  function nearestIndex(xs, x) {
    let lo = 0, hi = xs.length - 1;
    while (hi - lo > 1) { const m = (lo + hi) >> 1; if (xs[m] < x) lo = m; else hi = m; }
    return Math.abs(xs[lo] - x) <= Math.abs(xs[hi] - x) ? lo : hi;
  }

  function nearest(points, x) {
    if (!points.length) return null;
    let lo = 0, hi = points.length - 1;
    while (hi - lo > 1) { const m = (lo + hi) >> 1; if (points[m][0] < x) lo = m; else hi = m; }
    return Math.abs(points[lo][0] - x) <= Math.abs(points[hi][0] - x) ? points[lo] : points[hi];
  }

  global.Charts = { LineChart, StackedAreaChart, StackedBarChart, fmtSI, fmtSeconds, fmtPercent, trim };
})(window);

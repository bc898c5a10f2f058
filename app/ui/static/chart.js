// A small SVG line chart for loss curves: x = optimizer step, one line per series.
// data-points on the <svg> counts the points drawn (the browser test watches it grow).

const SVG = "http://www.w3.org/2000/svg";
const W = 720;
const H = 280;
const M = { left: 56, right: 16, top: 16, bottom: 36 };

function node(tag, attrs = {}, text) {
  const n = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, String(v));
  if (text !== undefined) n.textContent = text;
  return n;
}

function ticks(lo, hi, count) {
  if (hi === lo) return [lo];
  const step = (hi - lo) / count;
  return Array.from({ length: count + 1 }, (_, i) => lo + i * step);
}

function label(value) {
  const abs = Math.abs(value);
  if (abs !== 0 && (abs < 0.01 || abs >= 1e4)) return value.toExponential(1);
  return abs < 10 ? value.toFixed(2) : value.toFixed(0);
}

export class LineChart {
  // series: [{name, className}], drawn in that order
  constructor(series, { xLabel = "step", yLabel = "loss" } = {}) {
    this.series = series.map((s) => ({ ...s, points: [] }));
    this.xLabel = xLabel;
    this.xMax = 0;  // the x axis spans at least this far (a job's planned steps)
    this.yLabel = yLabel;
    this.svg = node("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img" });
    this.svg.setAttribute("aria-label", `${yLabel} by ${xLabel}`);
    this.draw();
  }

  add(name, x, y) {
    if (typeof y !== "number" || !Number.isFinite(y)) return;
    this.series.find((s) => s.name === name).points.push([x, y]);
    this.draw();
  }

  draw() {
    const svg = this.svg;
    svg.replaceChildren();
    const all = this.series.flatMap((s) => s.points);
    svg.dataset.points = String(all.length);
    for (const s of this.series) svg.dataset[`${s.name}Points`] = String(s.points.length);
    if (!all.length) {
      svg.append(node("text", { x: W / 2, y: H / 2, class: "empty" }, "no metrics yet"));
      return;
    }
    const xs = all.map((p) => p[0]);
    const ys = all.map((p) => p[1]);
    const x0 = Math.min(0, ...xs);
    const x1 = Math.max(x0 + 1, this.xMax, ...xs);
    let y0 = Math.min(...ys);
    let y1 = Math.max(...ys);
    const pad = (y1 - y0) * 0.05 || Math.abs(y1) * 0.05 || 1;
    y0 = Math.max(0, y0 - pad);
    y1 += pad;
    const px = (x) => M.left + ((x - x0) / (x1 - x0)) * (W - M.left - M.right);
    const py = (y) => H - M.bottom - ((y - y0) / (y1 - y0)) * (H - M.top - M.bottom);

    const axes = node("g", { class: "axes" });
    for (const y of ticks(y0, y1, 4)) {
      axes.append(node("line", { x1: M.left, x2: W - M.right, y1: py(y), y2: py(y), class: "grid" }));
      axes.append(node("text", { x: M.left - 6, y: py(y) + 4, class: "ytick" }, label(y)));
    }
    const xStep = Math.max(1, Math.ceil((x1 - x0) / 8));
    for (let x = Math.ceil(x0 / xStep) * xStep; x <= x1; x += xStep) {
      axes.append(node("text", { x: px(x), y: H - M.bottom + 16, class: "xtick" }, String(x)));
    }
    axes.append(node("text", { x: (M.left + W - M.right) / 2, y: H - 4, class: "xlabel" }, this.xLabel));
    axes.append(node("line", { x1: M.left, x2: W - M.right, y1: H - M.bottom, y2: H - M.bottom, class: "axis" }));
    axes.append(node("line", { x1: M.left, x2: M.left, y1: M.top, y2: H - M.bottom, class: "axis" }));
    svg.append(axes);

    const legend = node("g", { class: "legend" });
    this.series.forEach((s, i) => {
      const lineGroup = node("g", { class: `series ${s.className}` });
      if (s.points.length) {
        const coords = s.points.map(([x, y]) => `${px(x).toFixed(1)},${py(y).toFixed(1)}`);
        lineGroup.append(node("polyline", { points: coords.join(" ") }));
        if (s.points.length <= 60) {
          for (const [x, y] of s.points) lineGroup.append(node("circle", { cx: px(x), cy: py(y), r: 2.5 }));
        }
      }
      svg.append(lineGroup);
      const lx = W - M.right - 150 + i * 80;
      legend.append(node("rect", { x: lx, y: M.top, width: 12, height: 4, class: `swatch ${s.className}` }));
      legend.append(node("text", { x: lx + 16, y: M.top + 6 }, s.name));
    });
    svg.append(legend);
  }
}

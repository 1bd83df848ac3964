// Small SVG charts drawn by our own code: per-epoch line charts (no charting library, no CDN).

const SVG_NS = "http://www.w3.org/2000/svg";
const COLORS = ["#2f6fde", "#e0731f", "#1b7f4b", "#8e44ad"];

function svgEl(name, attrs = {}, text = null) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, String(value));
  if (text !== null) el.textContent = text;
  return el;
}

function niceTicks(min, max, count = 4) {
  if (!(max > min)) return [min];
  const raw = (max - min) / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let v = Math.ceil(min / step) * step; v <= max + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(6)));
  return ticks;
}

/**
 * Draw line series into an <svg> with a 480x240 viewBox.
 * series: [{name, points: [[x, y], ...]}]; options: {yMin, yMax, xLabel}.
 */
export function lineChart(svg, series, options = {}) {
  svg.replaceChildren();
  const width = 480, height = 240, left = 46, right = 12, top = 28, bottom = 34;
  const drawn = series.filter((s) => s.points.some(([, y]) => Number.isFinite(y)));
  svg.dataset.series = String(drawn.length);
  svg.dataset.points = String(Math.max(0, ...drawn.map((s) => s.points.length)));
  if (!drawn.length) {
    svg.append(svgEl("text", {x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty"},
      "No epochs yet"));
    return;
  }
  const xs = drawn.flatMap((s) => s.points.map(([x]) => x));
  const ys = drawn.flatMap((s) => s.points.map(([, y]) => y)).filter(Number.isFinite);
  const xMin = Math.min(...xs), xMax = Math.max(...xs, xMin + 1);
  let yMin = options.yMin ?? Math.min(...ys), yMax = options.yMax ?? Math.max(...ys);
  if (yMax - yMin < 1e-9) { yMin -= 0.5; yMax += 0.5; }
  const sx = (x) => left + ((x - xMin) / (xMax - xMin)) * (width - left - right);
  const sy = (y) => top + (1 - (y - yMin) / (yMax - yMin)) * (height - top - bottom);

  for (const tick of niceTicks(yMin, yMax)) {
    svg.append(svgEl("line", {x1: left, x2: width - right, y1: sy(tick), y2: sy(tick), class: "grid-line"}));
    svg.append(svgEl("text", {x: left - 6, y: sy(tick) + 4, "text-anchor": "end"}, String(tick)));
  }
  const xTicks = niceTicks(xMin, xMax, Math.min(6, xMax - xMin)).filter((t) => Number.isInteger(t));
  for (const tick of xTicks) {
    svg.append(svgEl("text", {x: sx(tick), y: height - bottom + 16, "text-anchor": "middle"}, String(tick)));
  }
  svg.append(svgEl("line", {x1: left, x2: left, y1: top, y2: height - bottom, class: "axis"}));
  svg.append(svgEl("line", {x1: left, x2: width - right, y1: height - bottom, y2: height - bottom, class: "axis"}));
  svg.append(svgEl("text", {x: (left + width - right) / 2, y: height - 4, "text-anchor": "middle"},
    options.xLabel || "epoch"));

  drawn.forEach((s, index) => {
    const color = COLORS[index % COLORS.length];
    const points = s.points.filter(([, y]) => Number.isFinite(y));
    const path = svgEl("polyline", {class: "series", stroke: color,
      points: points.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ")});
    path.append(svgEl("title", {}, s.name));
    svg.append(path);
    if (points.length === 1) {
      svg.append(svgEl("circle", {cx: sx(points[0][0]), cy: sy(points[0][1]), r: 3, fill: color}));
    }
    const lx = left + 8 + index * 110;
    svg.append(svgEl("rect", {x: lx, y: 8, width: 14, height: 4, fill: color}));
    svg.append(svgEl("text", {x: lx + 18, y: 14}, s.name));
  });
}

/** Curves of a Keras-style history {metric: [per epoch]} or {epoch: [...], metric: [...]}. */
export function historySeries(history, names) {
  const epochs = history.epoch || (history[names[0][0]] || []).map((_, i) => i + 1);
  return names.filter(([key]) => Array.isArray(history[key]))
    .map(([key, label]) => ({name: label, points: history[key].map((y, i) => [epochs[i] ?? i + 1, y ?? NaN])}));
}

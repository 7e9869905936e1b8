// A small SVG line chart, redrawn whole on each update (a few hundred points at most).
// Non-finite values are not points: a line skips them, and a labelled rule ("NaN", "inf",
// "-inf") marks where each kind first appears, so a diverged loss shows without an axis that
// runs to infinity.
import { extent } from "./series.js";
import { formatNumber } from "./format.js";
import { nonFiniteMarks } from "./nonfinite.js";

const SVG = "http://www.w3.org/2000/svg";
const PAD = { left: 46, right: 8, top: 18, bottom: 18 };

/**
 * `marks` says where the line's non-finite values are, for a line whose xs/ys no longer hold
 * them (a downsampled curve); by default they are found in xs/ys.
 * @typedef {{x: number, label: string}} Mark
 * @typedef {{xs: number[], ys: number[], cls: string, dots?: boolean, marks?: Mark[]}} Line
 */

/**
 * @param {string} tag
 * @param {Record<string, string | number>} attrs
 * @returns {SVGElement}
 */
function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

/**
 * Replace the content of `root` (an <svg>) with a chart of `lines`.
 * @param {SVGSVGElement} root
 * @param {{title: string, lines: Line[], width: number, height: number}} spec
 * @returns {number} the number of points drawn
 */
export function drawChart(root, { title, lines, width, height }) {
  root.replaceChildren();
  root.setAttribute("viewBox", `0 0 ${width} ${height}`);
  root.setAttribute("width", String(width));
  root.setAttribute("height", String(height));
  const innerW = width - PAD.left - PAD.right;
  const innerH = height - PAD.top - PAD.bottom;
  root.append(svg("rect", { class: "aiaas-frame", x: PAD.left, y: PAD.top, width: innerW, height: innerH }));
  const label = svg("text", { class: "aiaas-axis", x: PAD.left, y: 12 });
  label.textContent = title;
  root.append(label);
  const marks = uniqueMarks(lines);
  const xr = extent([...lines.map((l) => l.xs), marks.map((m) => m.x)]);
  const yr = extent(lines.map((l) => l.ys));
  if (!xr || (!yr && !marks.length)) return 0;
  const sx = (/** @type {number} */ x) => PAD.left + ((x - xr[0]) / (xr[1] - xr[0])) * innerW;
  // With no finite value at all there are only marks to draw: no y axis, no points.
  const [y0, y1] = yr || [0, 1];
  const sy = (/** @type {number} */ y) => PAD.top + innerH - ((y - y0) / (y1 - y0)) * innerH;
  for (const value of yr ? [y0, (y0 + y1) / 2, y1] : []) {
    const tick = svg("text", { class: "aiaas-axis", x: PAD.left - 4, y: (sy(value) + 3).toFixed(1), "text-anchor": "end" });
    tick.textContent = formatNumber(value, 3);
    root.append(tick);
  }
  for (const [value, anchor] of /** @type {Array<[number, string]>} */ ([[xr[0], "start"], [xr[1], "end"]])) {
    const tick = svg("text", { class: "aiaas-axis", x: sx(value).toFixed(1), y: height - 4, "text-anchor": anchor });
    tick.textContent = String(Math.round(value));
    root.append(tick);
  }
  let drawn = 0;
  for (const line of lines) {
    const pts = [];
    for (let i = 0; i < line.xs.length; i++) {
      if (Number.isFinite(line.xs[i]) && Number.isFinite(line.ys[i])) pts.push([sx(line.xs[i]), sy(line.ys[i])]);
    }
    if (!pts.length) continue;
    drawn += pts.length;
    root.append(svg("polyline", {
      class: `aiaas-line ${line.cls}`,
      points: pts.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" "),
      "data-points": pts.length,
    }));
    if (line.dots) {
      for (const [x, y] of pts) root.append(svg("circle", { class: `aiaas-dot ${line.cls}`, cx: x.toFixed(1), cy: y.toFixed(1), r: 2.5 }));
    }
  }
  for (const { x, label, cls } of marks) {
    const at = sx(x);
    // -inf is below every value, NaN and inf are above: the label sits at that edge.
    const low = label === "-inf";
    root.append(svg("line", { class: `aiaas-nonfinite-rule ${cls}`, x1: at.toFixed(1), x2: at.toFixed(1), y1: PAD.top, y2: PAD.top + innerH }));
    const text = svg("text", {
      class: `aiaas-nonfinite ${cls}`, x: (at + (at > PAD.left + innerW / 2 ? -3 : 3)).toFixed(1),
      y: low ? PAD.top + innerH - 3 : PAD.top + 10, "text-anchor": at > PAD.left + innerW / 2 ? "end" : "start",
      "data-x": x,
    });
    text.textContent = label;
    root.append(text);
  }
  return drawn;
}

/**
 * Every line's non-finite marks, once per (x, label) even when two lines share one (a diverged
 * step that is also its epoch's last).
 * @param {Line[]} lines
 * @returns {Array<Mark & {cls: string}>}
 */
function uniqueMarks(lines) {
  const seen = new Set();
  const out = [];
  for (const line of lines) {
    for (const mark of line.marks ?? nonFiniteMarks(line.xs, line.ys)) {
      const key = `${mark.x} ${mark.label}`;
      if (!seen.has(key)) { seen.add(key); out.push({ ...mark, cls: line.cls }); }
    }
  }
  return out;
}

// A small SVG line chart, redrawn whole on each update (a few hundred points at most).
import { extent } from "./series.js";
import { formatNumber } from "./format.js";

const SVG = "http://www.w3.org/2000/svg";
const PAD = { left: 46, right: 8, top: 18, bottom: 18 };

/**
 * @typedef {{xs: number[], ys: number[], cls: string, dots?: boolean}} Line
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
  const xr = extent(lines.map((l) => l.xs));
  const yr = extent(lines.map((l) => l.ys));
  if (!xr || !yr) return 0;
  const sx = (/** @type {number} */ x) => PAD.left + ((x - xr[0]) / (xr[1] - xr[0])) * innerW;
  const sy = (/** @type {number} */ y) => PAD.top + innerH - ((y - yr[0]) / (yr[1] - yr[0])) * innerH;
  for (const value of [yr[0], (yr[0] + yr[1]) / 2, yr[1]]) {
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
  return drawn;
}

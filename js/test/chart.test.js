import { test } from "node:test";
import assert from "node:assert/strict";
import { FakeElement, installFakeDom } from "./fake-dom.js";

installFakeDom();
const { drawChart } = await import("../src/chart.js");

/** @param {FakeElement} svg */
function polylines(svg) {
  return svg.findTag("polyline").map((p) => p.getAttribute("points").split(" ").map((xy) => xy.split(",").map(Number)));
}

test("lines are scaled into the frame: first point at the bottom left, last at the top right", () => {
  const svg = new FakeElement("svg");
  const drawn = drawChart(/** @type {any} */ (svg), {
    title: "loss", width: 320, height: 160, lines: [{ xs: [0, 5, 10], ys: [0, 0.5, 1], cls: "aiaas-train" }],
  });
  assert.equal(drawn, 3);
  assert.equal(svg.getAttribute("viewBox"), "0 0 320 160");
  const frame = svg.find("aiaas-frame");
  const [left, top] = [Number(frame.getAttribute("x")), Number(frame.getAttribute("y"))];
  const [right, bottom] = [left + Number(frame.getAttribute("width")), top + Number(frame.getAttribute("height"))];
  const [points] = polylines(svg);
  assert.deepEqual(points[0], [left, bottom]);
  assert.deepEqual(points[2], [right, top]);
  assert.deepEqual(points[1], [(left + right) / 2, (top + bottom) / 2]);
  assert.equal(svg.findTag("polyline")[0].getAttribute("class"), "aiaas-line aiaas-train");
  // the title, three y ticks (min, middle, max) and two x ticks (first and last step)
  assert.deepEqual(svg.findTag("text").map((t) => t.textContent), ["loss", "0.000", "0.500", "1.000", "0", "10"]);
});

test("empty lines draw nothing, dots are one circle per point", () => {
  const svg = new FakeElement("svg");
  const drawn = drawChart(/** @type {any} */ (svg), {
    title: "t", width: 100, height: 80, lines: [
      { xs: [1, 4], ys: [1, 2], cls: "a", dots: true },
      { xs: [], ys: [], cls: "b" },
    ],
  });
  assert.equal(drawn, 2);
  assert.equal(svg.findTag("polyline").length, 1);
  assert.equal(svg.findTag("circle").length, 2);
  assert.equal(svg.findTag("polyline")[0].getAttribute("data-points"), "2");
});

test("nothing to draw: just the frame and title, and the previous chart is gone", () => {
  const svg = new FakeElement("svg");
  drawChart(/** @type {any} */ (svg), { title: "t", width: 100, height: 80, lines: [{ xs: [1, 2], ys: [3, 4], cls: "a" }] });
  assert.equal(drawChart(/** @type {any} */ (svg), { title: "empty", width: 100, height: 80, lines: [{ xs: [], ys: [], cls: "a" }] }), 0);
  assert.equal(svg.findTag("polyline").length, 0);
  assert.deepEqual(svg.findTag("text").map((t) => t.textContent), ["empty"]);
});

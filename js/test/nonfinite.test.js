// Non-finite numbers: decoded from the kernel's state, formatted, and marked (not drawn) in charts.
import { test } from "node:test";
import assert from "node:assert/strict";
import { decodeNumber, decodeState, nonFiniteLabel, nonFiniteMarks } from "../src/nonfinite.js";
import { formatNumber } from "../src/format.js";
import { drawChart } from "../src/chart.js";

test("the wire strings decode to NaN and the infinities; numbers and null pass through", () => {
  assert.ok(Number.isNaN(decodeNumber("NaN")));
  assert.equal(decodeNumber("Infinity"), Infinity);
  assert.equal(decodeNumber("-Infinity"), -Infinity);
  assert.equal(decodeNumber(0.25), 0.25);
  assert.equal(decodeNumber(null), null);
  assert.equal(decodeNumber(undefined), null);
  for (const other of ["nan", "inf", "1.5", "", "toString", "__proto__"]) assert.equal(decodeNumber(other), null, other);
});

test("decoding a state touches only its number fields and leaves the message as it was", () => {
  const raw = { status: "failed", error: "NaN", reason: "Infinity", loss: "NaN", elapsed: 1.5, step: 7, columns: ["loss"] };
  const state = decodeState(raw);
  assert.ok(Number.isNaN(state.loss));
  assert.equal(state.elapsed, 1.5);
  assert.equal(state.step, 7);
  assert.equal(state.error, "NaN"); // text stays text
  assert.equal(state.reason, "Infinity");
  assert.deepEqual(state.columns, ["loss"]);
  assert.equal(raw.loss, "NaN"); // a copy: the model's own value is not rewritten
  assert.equal(decodeState({ loss: "-Infinity" }).loss, -Infinity);
  assert.equal(decodeState({ loss: null }).loss, null);
  assert.deepEqual(decodeState(undefined), {});
});

test("non-finite values read NaN / inf / -inf; unknown values a dash", () => {
  assert.equal(nonFiniteLabel(NaN), "NaN");
  assert.equal(nonFiniteLabel(Infinity), "inf");
  assert.equal(nonFiniteLabel(-Infinity), "-inf");
  assert.equal(nonFiniteLabel(1), null);
  assert.equal(nonFiniteLabel(null), null);
  assert.equal(formatNumber(NaN), "NaN");
  assert.equal(formatNumber(Infinity), "inf");
  assert.equal(formatNumber(-Infinity, 2), "-inf");
  assert.equal(formatNumber(decodeNumber("Infinity")), "inf");
  assert.equal(formatNumber(null), "–");
  assert.equal(formatNumber(undefined), "–");
});

test("marks give the first x of each kind of non-finite value", () => {
  const xs = [1, 2, 3, 4, 5, 6];
  assert.deepEqual(nonFiniteMarks(xs, [0.5, NaN, NaN, Infinity, -Infinity, NaN]),
    [{ x: 2, label: "NaN" }, { x: 4, label: "inf" }, { x: 5, label: "-inf" }]);
  assert.deepEqual(nonFiniteMarks(xs, [1, 2, 3, 4, 5, 6]), []);
  assert.deepEqual(nonFiniteMarks(new Float32Array([1, 2]), new Float32Array([1, NaN])), [{ x: 2, label: "NaN" }]);
  assert.deepEqual(nonFiniteMarks([NaN], [NaN]), [], "a point with no x has nowhere to go");
});

// drawChart builds SVG nodes; node has no DOM, so a minimal element stands in for one.
class FakeNode {
  /** @param {string} tag */
  constructor(tag) { this.tag = tag; this.attrs = {}; this.children = []; this.textContent = ""; }
  setAttribute(k, v) { this.attrs[k] = v; } // chart.js passes strings, as the DOM keeps them
  append(...nodes) { this.children.push(...nodes); }
  replaceChildren() { this.children = []; }
}
globalThis.document = /** @type {any} */ ({ createElementNS: (_ns, tag) => new FakeNode(tag) });

/** @param {any[]} lines */
function chart(lines) {
  const root = /** @type {any} */ (new FakeNode("svg"));
  const drawn = drawChart(root, { title: "loss", lines, width: 320, height: 160 });
  const of = (/** @type {string} */ tag) => root.children.filter((n) => n.tag === tag);
  return { drawn, root, of };
}

test("a chart skips non-finite points, keeps its axis finite, and labels where they are", () => {
  const { drawn, of } = chart([{ xs: [1, 2, 3, 4], ys: [0.5, 0.4, Infinity, NaN], cls: "aiaas-raw" }]);
  assert.equal(drawn, 2);
  const [line] = of("polyline");
  assert.equal(line.attrs["data-points"], "2");
  for (const coord of line.attrs.points.split(/[ ,]/)) assert.ok(Number.isFinite(Number(coord)), line.attrs.points);
  const ticks = of("text").filter((t) => t.attrs.class === "aiaas-axis").map((t) => t.textContent);
  assert.ok(!ticks.some((t) => /inf|NaN|∞/.test(t)), `axis ticks stay finite: ${ticks}`);
  const marks = of("text").filter((t) => t.attrs.class.startsWith("aiaas-nonfinite"));
  assert.deepEqual(marks.map((m) => [m.textContent, m.attrs["data-x"]]), [["inf", "3"], ["NaN", "4"]]);
  for (const m of marks) assert.ok(Number.isFinite(Number(m.attrs.x)) && Number.isFinite(Number(m.attrs.y)));
  assert.equal(of("line").length, 2);
});

test("marks given for a downsampled curve are drawn, once per place, and widen the x range", () => {
  const { of } = chart([
    { xs: [1, 2], ys: [0.5, 0.4], cls: "aiaas-raw", marks: [{ x: 10, label: "NaN" }] },
    { xs: [10], ys: [NaN], cls: "aiaas-train" }, // the epoch that ended on the same step
  ]);
  const marks = of("text").filter((t) => t.attrs.class.startsWith("aiaas-nonfinite"));
  assert.deepEqual(marks.map((m) => m.textContent), ["NaN"]);
  const right = of("text").find((t) => t.attrs.class === "aiaas-axis" && t.attrs["text-anchor"] === "end" && t.textContent === "10");
  assert.ok(right, "the x axis reaches the mark");
});

test("a chart with nothing finite shows only its marks, and an empty one nothing", () => {
  const only = chart([{ xs: [1, 2], ys: [NaN, NaN], cls: "aiaas-val" }]);
  assert.equal(only.drawn, 0);
  assert.equal(only.of("polyline").length, 0);
  assert.deepEqual(only.of("text").filter((t) => t.attrs.class.startsWith("aiaas-nonfinite")).map((t) => t.textContent), ["NaN"]);
  assert.ok(!only.of("text").some((t) => t.attrs.class === "aiaas-axis" && t.attrs.x === "42"), "no y axis without a finite value");
  assert.equal(chart([{ xs: [], ys: [], cls: "aiaas-raw" }]).drawn, 0);
});

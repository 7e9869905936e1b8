import { test } from "node:test";
import assert from "node:assert/strict";
import { decodeFloat32, decodeRows, downsample, ema, extent, splitCurve } from "../src/series.js";

test("float32 payloads decode from unaligned DataViews", () => {
  const values = new Float32Array([1, 2, 3, 4]);
  const bytes = new Uint8Array(1 + values.byteLength);
  bytes.set(new Uint8Array(values.buffer), 1); // starts at byte 1: a Float32Array view would throw
  const decoded = decodeFloat32(new DataView(bytes.buffer, 1, values.byteLength));
  assert.deepEqual(Array.from(decoded), [1, 2, 3, 4]);
  assert.equal(decodeFloat32(undefined).length, 0);
  assert.deepEqual(Array.from(decodeFloat32(values.buffer)), [1, 2, 3, 4]);
});

test("the loss curve is all steps then all losses; epoch rows are [epoch, ...columns]", () => {
  assert.deepEqual(splitCurve(new Float32Array([10, 20, 0.5, 0.25])), { xs: [10, 20], ys: [0.5, 0.25] });
  const rows = decodeRows(new Float32Array([1, 0.5, 0.75, 2, 0.25, 0.875]), ["loss", "accuracy"]);
  assert.deepEqual(rows, [{ epoch: 1, loss: 0.5, accuracy: 0.75 }, { epoch: 2, loss: 0.25, accuracy: 0.875 }]);
});

test("the moving average starts at the first value and skips NaN", () => {
  assert.deepEqual(ema([1, 1, 1]), [1, 1, 1]);
  const out = ema([0, 10, NaN, 10], 0.5);
  assert.deepEqual(out.slice(0, 2), [0, 5]);
  assert.ok(Number.isNaN(out[2]));
  assert.equal(out[3], 7.5);
});

test("downsampling keeps at most the threshold, the ends, and the spikes", () => {
  const xs = Array.from({ length: 1000 }, (_, i) => i);
  const ys = xs.map((x) => (x === 500 ? 100 : Math.sin(x / 50)));
  const out = downsample(xs, ys, 50);
  assert.equal(out.xs.length, 50);
  assert.equal(out.xs[0], 0);
  assert.equal(out.xs[49], 999);
  assert.ok(out.ys.includes(100), "the spike at x=500 survives");
  for (let i = 1; i < out.xs.length; i++) assert.ok(out.xs[i] > out.xs[i - 1], "x stays increasing");
});

test("downsampling leaves short curves whole and drops non-finite points", () => {
  assert.deepEqual(downsample([1, 2, 3], [4, NaN, 6], 10), { xs: [1, 3], ys: [4, 6] });
  assert.deepEqual(downsample([1, 2, 3], [4, 5, 6], 2), { xs: [1, 2, 3], ys: [4, 5, 6] });
});

test("extents ignore non-finite values and widen flat ranges", () => {
  assert.deepEqual(extent([[1, NaN, 3], [2]]), [1, 3]);
  assert.deepEqual(extent([[2, 2]]), [1.8, 2.2]);
  assert.deepEqual(extent([[0]]), [-1, 1]);
  assert.equal(extent([[NaN], []]), null);
});

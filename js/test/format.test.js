import { test } from "node:test";
import assert from "node:assert/strict";
import { eta, formatDuration, formatNumber, formatRate } from "../src/format.js";

test("durations read m:ss under an hour and h:mm:ss above, like the Python text progress", () => {
  assert.equal(formatDuration(0), "0:00");
  assert.equal(formatDuration(59.4), "0:59");
  assert.equal(formatDuration(59.6), "1:00");
  assert.equal(formatDuration(3599), "59:59");
  assert.equal(formatDuration(3600), "1:00:00");
  assert.equal(formatDuration(3 * 3600 + 5 * 60 + 7), "3:05:07");
  assert.equal(formatDuration(-5), "0:00");
});

test("unknown durations show a dash", () => {
  for (const v of [null, undefined, NaN, Infinity]) assert.equal(formatDuration(v), "–");
});

test("numbers use fixed decimals in the usual range and exponents outside it", () => {
  assert.equal(formatNumber(0.123456), "0.1235");
  assert.equal(formatNumber(2.5), "2.5000");
  assert.equal(formatNumber(0), "0.0000");
  assert.equal(formatNumber(0.0001234), "1.23e-4");
  assert.equal(formatNumber(123456), "1.23e+5");
  assert.equal(formatNumber(-0.5, 2), "-0.50");
  assert.equal(formatNumber(NaN), "NaN");
  assert.equal(formatNumber(null), "–");
  assert.equal(formatNumber(Infinity), "inf");
  assert.equal(formatNumber(-Infinity), "-inf");
});

test("rates take k and M suffixes", () => {
  assert.equal(formatRate(950), "950");
  assert.equal(formatRate(54_210), "54.2k");
  assert.equal(formatRate(1_250_000), "1.3M");
  assert.equal(formatRate(-1), "–");
  assert.equal(formatRate(NaN), "–");
});

test("ETA assumes the average pace so far", () => {
  assert.equal(eta(25, 100, 10), 30);
  assert.equal(eta(100, 100, 10), 0);
  assert.equal(eta(150, 100, 10), 0);
  assert.equal(eta(0, 100, 10), null);
  assert.equal(eta(10, 0, 10), null);
  assert.equal(eta(10, 100, NaN), null);
});

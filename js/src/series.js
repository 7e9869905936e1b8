// Decoding the kernel's float32 payloads, smoothing and downsampling curves, axis extents.
// Pure functions: unit-tested in node.

/**
 * A Float32Array copy of a binary trait value (DataView, ArrayBuffer or typed array). Copying
 * also fixes alignment: a DataView into a message buffer may start at any byte.
 * @param {DataView | ArrayBuffer | ArrayBufferView | null | undefined} value
 * @returns {Float32Array}
 */
export function decodeFloat32(value) {
  if (!value) return new Float32Array(0);
  if (value instanceof ArrayBuffer) return new Float32Array(value.slice(0, value.byteLength - (value.byteLength % 4)));
  const view = /** @type {ArrayBufferView} */ (value);
  const length = view.byteLength - (view.byteLength % 4);
  return new Float32Array(view.buffer.slice(view.byteOffset, view.byteOffset + length));
}

/**
 * The loss curve: the kernel sends all steps, then all losses.
 * @param {Float32Array} flat
 * @returns {{xs: number[], ys: number[]}}
 */
export function splitCurve(flat) {
  const n = Math.floor(flat.length / 2);
  return { xs: Array.from(flat.subarray(0, n)), ys: Array.from(flat.subarray(n, 2 * n)) };
}

/**
 * Epoch rows: [epoch, ...columns] repeated.
 * @param {Float32Array} flat
 * @param {string[]} columns
 * @returns {Array<Record<string, number>>}
 */
export function decodeRows(flat, columns) {
  const width = columns.length + 1;
  const rows = [];
  for (let i = 0; i + width <= flat.length; i += width) {
    /** @type {Record<string, number>} */
    const row = { epoch: Math.round(flat[i]) };
    columns.forEach((c, j) => { row[c] = flat[i + 1 + j]; });
    rows.push(row);
  }
  return rows;
}

/**
 * Exponential moving average; NaN values are carried through without resetting the average.
 * @param {number[]} values
 * @param {number} [weight] how much of the past each point keeps, 0..1
 * @returns {number[]}
 */
export function ema(values, weight = 0.8) {
  const out = [];
  let last = NaN;
  for (const v of values) {
    if (!Number.isFinite(v)) { out.push(NaN); continue; }
    last = Number.isFinite(last) ? weight * last + (1 - weight) * v : v;
    out.push(last);
  }
  return out;
}

/**
 * Largest-triangle-three-buckets: at most `threshold` points that keep the curve's shape, the
 * first and last points always included. Non-finite points are dropped first; a threshold below
 * 3 leaves the curve whole.
 * @param {number[]} xs
 * @param {number[]} ys
 * @param {number} threshold
 * @returns {{xs: number[], ys: number[]}}
 */
export function downsample(xs, ys, threshold) {
  const px = [];
  const py = [];
  for (let i = 0; i < Math.min(xs.length, ys.length); i++) {
    if (Number.isFinite(xs[i]) && Number.isFinite(ys[i])) { px.push(xs[i]); py.push(ys[i]); }
  }
  const n = px.length;
  if (threshold >= n || threshold < 3) return { xs: px, ys: py };
  const outX = [px[0]];
  const outY = [py[0]];
  const every = (n - 2) / (threshold - 2);
  let a = 0;
  for (let i = 0; i < threshold - 2; i++) {
    // The average of the next bucket is the third corner of the triangle.
    const nextStart = Math.floor((i + 1) * every) + 1;
    const nextEnd = Math.min(Math.floor((i + 2) * every) + 1, n);
    let avgX = 0;
    let avgY = 0;
    for (let j = nextStart; j < nextEnd; j++) { avgX += px[j]; avgY += py[j]; }
    const count = Math.max(nextEnd - nextStart, 1);
    avgX /= count;
    avgY /= count;
    const start = Math.floor(i * every) + 1;
    const end = Math.floor((i + 1) * every) + 1;
    let best = start;
    let bestArea = -1;
    for (let j = start; j < end; j++) {
      const area = Math.abs((px[a] - avgX) * (py[j] - py[a]) - (px[a] - px[j]) * (avgY - py[a]));
      if (area > bestArea) { bestArea = area; best = j; }
    }
    outX.push(px[best]);
    outY.push(py[best]);
    a = best;
  }
  outX.push(px[n - 1]);
  outY.push(py[n - 1]);
  return { xs: outX, ys: outY };
}

/**
 * [min, max] of the finite values, widened when flat so a scale never divides by zero.
 * @param {number[][]} groups
 * @returns {[number, number] | null}
 */
export function extent(groups) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const values of groups) {
    for (const v of values) {
      if (Number.isFinite(v)) { if (v < lo) lo = v; if (v > hi) hi = v; }
    }
  }
  if (lo === Infinity) return null;
  if (hi === lo) { const pad = Math.abs(lo) * 0.1 || 1; return [lo - pad, hi + pad]; }
  return [lo, hi];
}

// Non-finite numbers (a diverged loss, an overflowed validation loss) in the widget.
//
// The synced state travels as JSON, which has no NaN or infinity: jupyter_client's serialiser
// refuses them (allow_nan=False). So the kernel sends a non-finite float in the state's scalar
// fields as one of the strings "NaN", "Infinity", "-Infinity" (the spelling of the engine's event
// codec, aiaas_lab.engine.events.to_wire, and of JavaScript's own Number()), and `decodeState`
// turns them back into numbers, in the number fields only, so a free-text field such as `error`
// is never mistaken for one. The loss curve and the epoch rows are float32 bytes, which carry
// NaN and infinities as they are. People read them as "NaN", "inf" and "-inf", like the Python
// views; a chart skips them and marks where they are instead of drawing a line to infinity.

/** @type {Record<string, number>} */
const WIRE = { NaN: NaN, Infinity: Infinity, "-Infinity": -Infinity };

/** The state's fields that hold numbers. */
export const NUMBER_FIELDS = [
  "epochs", "start_epoch", "steps_per_epoch", "batch_size", "train_samples", "epoch", "epochs_done",
  "epoch_step", "step", "samples", "loss", "elapsed", "history_total",
];

/**
 * A number field's value as a number: the wire strings become NaN / ±Infinity; null stays null
 * (not known yet), and so does anything else that is not a number.
 * @param {unknown} value
 * @returns {number | null}
 */
export function decodeNumber(value) {
  if (typeof value === "number") return value;
  if (typeof value === "string" && Object.prototype.hasOwnProperty.call(WIRE, value)) return WIRE[value];
  return null;
}

/**
 * The state as the kernel meant it: a shallow copy with the number fields decoded.
 * @template {Record<string, any>} S
 * @param {S | null | undefined} raw
 * @returns {S}
 */
export function decodeState(raw) {
  const state = /** @type {Record<string, any>} */ ({ ...(raw || {}) });
  for (const key of NUMBER_FIELDS) if (key in state) state[key] = decodeNumber(state[key]);
  return /** @type {S} */ (state);
}

/**
 * How a person reads a non-finite value, or null for a finite one (and for null).
 * @param {number | null | undefined} value
 * @returns {"NaN" | "inf" | "-inf" | null}
 */
export function nonFiniteLabel(value) {
  if (typeof value !== "number" || Number.isFinite(value)) return null;
  if (Number.isNaN(value)) return "NaN";
  return value > 0 ? "inf" : "-inf";
}

/**
 * Where a line has non-finite values: the first x of each kind (NaN, inf, -inf), so a chart can
 * mark them without one label per point.
 * @param {ArrayLike<number>} xs
 * @param {ArrayLike<number>} ys
 * @returns {Array<{x: number, label: string}>}
 */
export function nonFiniteMarks(xs, ys) {
  /** @type {Map<string, number>} */
  const first = new Map();
  for (let i = 0; i < Math.min(xs.length, ys.length); i++) {
    const label = nonFiniteLabel(ys[i]);
    if (label && Number.isFinite(xs[i]) && !first.has(label)) first.set(label, xs[i]);
  }
  return Array.from(first, ([label, x]) => ({ x, label }));
}

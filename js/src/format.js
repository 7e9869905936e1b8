// Number, time and ETA formatting for the training widget. Pure functions: unit-tested in node.
import { nonFiniteLabel } from "./nonfinite.js";

/**
 * "m:ss" under an hour, "h:mm:ss" above, like the Python text progress; "–" when unknown.
 * @param {number | null | undefined} seconds
 * @returns {string}
 */
export function formatDuration(seconds) {
  if (seconds == null || !Number.isFinite(seconds)) return "–";
  const total = Math.max(0, Math.round(seconds));
  const hours = Math.floor(total / 3600);
  const minutes = Math.floor((total % 3600) / 60);
  const secs = total % 60;
  const ss = String(secs).padStart(2, "0");
  return hours ? `${hours}:${String(minutes).padStart(2, "0")}:${ss}` : `${minutes}:${ss}`;
}

/**
 * A metric value: fixed decimals in the usual range, exponent notation for tiny or huge values,
 * "NaN" / "inf" / "-inf" for the non-finite ones (a diverged loss must show), "–" when unknown.
 * @param {number | null | undefined} value
 * @param {number} [digits]
 * @returns {string}
 */
export function formatNumber(value, digits = 4) {
  if (value == null) return "–";
  const label = nonFiniteLabel(value);
  if (label) return label;
  const magnitude = Math.abs(value);
  if (magnitude !== 0 && (magnitude >= 1e5 || magnitude < 10 ** -(digits - 1))) {
    return value.toExponential(2);
  }
  return value.toFixed(digits);
}

/**
 * Samples per second with a k / M suffix, like the Python text progress.
 * @param {number | null | undefined} perSecond
 * @returns {string}
 */
export function formatRate(perSecond) {
  if (perSecond == null || !Number.isFinite(perSecond) || perSecond < 0) return "–";
  if (perSecond >= 1e6) return `${(perSecond / 1e6).toFixed(1)}M`;
  if (perSecond >= 1e3) return `${(perSecond / 1e3).toFixed(1)}k`;
  return perSecond.toFixed(0);
}

/**
 * Seconds left, assuming the rest goes at the average pace so far; null until there is a pace.
 * @param {number} done steps done in this run
 * @param {number} total steps this run will take
 * @param {number} elapsed seconds so far
 * @returns {number | null}
 */
export function eta(done, total, elapsed) {
  if (!(done > 0) || !(total > 0) || !(elapsed >= 0)) return null;
  if (done >= total) return 0;
  return (elapsed * (total - done)) / done;
}

// The live training widget: bars, figures, loss and accuracy charts, epoch table, Stop button.
// The kernel sends the whole state in one `state` trait at most ten times a second; every update
// redraws from it (its non-finite numbers decoded first, see nonfinite.js), so a lost message costs nothing.
import { drawChart } from "./chart.js";
import { decodeFloat32, decodeRows, downsample, ema, splitCurve } from "./series.js";
import { eta, formatDuration, formatNumber, formatRate } from "./format.js";
import { decodeState, nonFiniteMarks } from "./nonfinite.js";

const STOP_HINT_MS = 2000;
const CHART = { width: 320, height: 160 };

/**
 * @typedef {object} State
 * @property {string} status
 * @property {string} reason
 * @property {string | null} error
 * @property {boolean} stop_requested
 * @property {number} epochs
 * @property {number} start_epoch
 * @property {number} steps_per_epoch
 * @property {number} epochs_done
 * @property {number} epoch_step
 * @property {number} step
 * @property {number} samples
 * @property {number | null} loss NaN or ±Infinity once decoded (see nonfinite.js); null before the first step
 * @property {number} elapsed
 * @property {string} checkpoint
 * @property {DataView} losses
 * @property {string[]} columns
 * @property {DataView} history
 * @property {number} history_total
 */

/** Views of each model, so a view left behind when an output is re-rendered can let go. */
const viewsOf = new WeakMap();

/**
 * @param {string} tag
 * @param {string} [cls]
 * @param {string} [text]
 * @returns {HTMLElement}
 */
function h(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text != null) node.textContent = text;
  return node;
}

/** @param {string} cls */
function bar(cls) {
  const root = h("div", `aiaas-bar ${cls}`);
  const label = h("span", "aiaas-bar-label");
  const track = h("div", "aiaas-bar-track");
  const fill = h("div", "aiaas-bar-fill");
  const pct = h("span", "aiaas-bar-pct");
  track.append(fill);
  root.append(label, track, pct);
  return {
    root,
    /** @param {string} text @param {number} value @param {number} max */
    set(text, value, max) {
      const fraction = max > 0 ? Math.min(1, Math.max(0, value / max)) : 0;
      label.textContent = text;
      fill.style.width = `${(fraction * 100).toFixed(1)}%`;
      pct.textContent = `${Math.round(fraction * 100)}%`;
      root.dataset.value = String(value);
      root.dataset.max = String(max);
      root.dataset.fraction = fraction.toFixed(4);
    },
  };
}

/** @param {State} s */
function statusText(s) {
  const done = s.epochs_done - s.start_epoch;
  switch (s.status) {
    case "failed":
      return `failed: ${s.error || s.reason}`;
    case "completed":
    case "stopped":
      return `${s.status} after ${done} epoch${done === 1 ? "" : "s"} in ${formatDuration(s.elapsed)}${s.reason ? ` (${s.reason})` : ""}`;
    case "running":
      return s.stop_requested ? "stopping at the next step…" : "running";
    default:
      return s.status;
  }
}

/** @param {{model: any, el: HTMLElement}} ctx */
function render({ model, el }) {
  const root = h("div", "aiaas-widget");
  const head = h("div", "aiaas-head");
  const status = h("span", "aiaas-status");
  const stop = /** @type {HTMLButtonElement} */ (h("button", "aiaas-stop jp-Button", "Stop"));
  stop.type = "button";
  stop.title = "Stop training at the next step; weights and history are kept";
  head.append(status, stop);
  const epochBar = bar("aiaas-epoch-bar");
  const stepBar = bar("aiaas-step-bar");
  const figures = h("div", "aiaas-figures");
  const charts = h("div", "aiaas-charts");
  const lossChart = /** @type {SVGSVGElement} */ (/** @type {unknown} */ (document.createElementNS("http://www.w3.org/2000/svg", "svg")));
  lossChart.setAttribute("class", "aiaas-chart aiaas-loss-chart");
  const accChart = /** @type {SVGSVGElement} */ (/** @type {unknown} */ (document.createElementNS("http://www.w3.org/2000/svg", "svg")));
  accChart.setAttribute("class", "aiaas-chart aiaas-acc-chart");
  charts.append(lossChart, accChart);
  const tableWrap = h("div", "aiaas-table-wrap");
  const hint = h("div", "aiaas-hint");
  root.append(head, epochBar.root, stepBar.root, figures, charts, tableWrap, hint);
  el.append(root);

  let receivedAt = performance.now();
  let clickedAt = 0;
  /** @type {State} */
  let state = decodeState(model.get("state"));

  /** @param {State} s */
  function drawFigures(s) {
    const running = s.status === "running";
    const elapsed = s.elapsed + (running ? (performance.now() - receivedAt) / 1000 : 0);
    const total = (s.epochs - s.start_epoch) * s.steps_per_epoch;
    const done = s.step - s.start_epoch * s.steps_per_epoch;
    const parts = [`elapsed ${formatDuration(elapsed)}`];
    if (running) parts.push(`ETA ${formatDuration(eta(done, total, s.elapsed))}`);
    if (s.samples && elapsed > 0) parts.push(`${formatRate(s.samples / Math.max(s.elapsed, 1e-9))} samples/s`);
    if (s.loss != null) parts.push(`loss ${formatNumber(s.loss)}`);
    figures.textContent = parts.join(" · ");
  }

  function draw() {
    const s = state;
    if (!s || !s.status) return;
    root.dataset.status = s.status;
    status.textContent = statusText(s);
    status.className = `aiaas-status aiaas-status-${s.status}`;
    const running = s.status === "running" || s.status === "starting";
    stop.disabled = !running || s.stop_requested || clickedAt > 0;
    stop.hidden = !running;
    if (clickedAt && running && !s.stop_requested && performance.now() - clickedAt > STOP_HINT_MS) {
      hint.textContent = "The kernel has not received the click while this cell runs; use the Interrupt button " +
        "(■), which also stops training at the next step.";
    } else {
      hint.textContent = "";
    }
    if (s.epochs) {
      epochBar.set(`epoch ${s.epochs_done}/${s.epochs}`, s.epochs_done, s.epochs);
      stepBar.set(`step ${s.epoch_step}/${s.steps_per_epoch}`, s.epoch_step, s.steps_per_epoch);
    }
    drawFigures(s);

    const curve = splitCurve(decodeFloat32(s.losses));
    const rows = decodeRows(decodeFloat32(s.history), s.columns || []);
    const raw = downsample(curve.xs, curve.ys, 2 * CHART.width);
    const lossLines = [
      // Downsampling drops non-finite points: their marks come from the whole curve.
      { xs: raw.xs, ys: raw.ys, cls: "aiaas-raw", marks: nonFiniteMarks(curve.xs, curve.ys) },
      { xs: raw.xs, ys: ema(raw.ys), cls: "aiaas-train aiaas-smooth" },
    ];
    const epochSteps = rows.map((r) => r.epoch * s.steps_per_epoch);
    const dots = rows.length <= 60; // past that, dots hide the lines
    if (s.columns.includes("loss")) lossLines.push({ xs: epochSteps, ys: rows.map((r) => r.loss), cls: "aiaas-train", dots });
    if (s.columns.includes("val_loss")) lossLines.push({ xs: epochSteps, ys: rows.map((r) => r.val_loss), cls: "aiaas-val", dots });
    const drawn = drawChart(lossChart, { title: "loss: per step (smoothed), per epoch (dots)", lines: lossLines, ...CHART });
    lossChart.dataset.points = String(drawn);
    const hasAcc = s.columns.includes("accuracy");
    accChart.style.display = hasAcc ? "" : "none";
    if (hasAcc) {
      const epochs = rows.map((r) => r.epoch);
      const accLines = [{ xs: epochs, ys: rows.map((r) => r.accuracy), cls: "aiaas-train", dots }];
      if (s.columns.includes("val_accuracy")) accLines.push({ xs: epochs, ys: rows.map((r) => r.val_accuracy), cls: "aiaas-val", dots });
      accChart.dataset.points = String(drawChart(accChart, { title: "accuracy per epoch (train, val)", lines: accLines, ...CHART }));
    }
    drawTable(rows, s);
  }

  // The table follows the newest epoch until the user scrolls up, and again once back at the end.
  let follow = true;
  tableWrap.addEventListener("scroll", () => {
    follow = tableWrap.scrollTop + tableWrap.clientHeight >= tableWrap.scrollHeight - 2;
  });
  // A view is first drawn before it is attached, where scrolling does nothing (a refreshed
  // snapshot re-renders the output with a new view): scroll once it has a size.
  const resized = new ResizeObserver(() => {
    if (follow) tableWrap.scrollTop = tableWrap.scrollHeight;
  });
  resized.observe(tableWrap);

  /** @param {Array<Record<string, number>>} rows @param {State} s */
  function drawTable(rows, s) {
    if (!rows.length) { tableWrap.replaceChildren(); return; }
    const table = h("table", "aiaas-table");
    const headRow = h("tr");
    for (const c of ["epoch", ...s.columns]) headRow.append(h("th", "", c));
    const thead = h("thead");
    thead.append(headRow);
    const tbody = h("tbody");
    for (const r of rows) {
      const tr = h("tr");
      tr.append(h("td", "", String(r.epoch)));
      for (const c of s.columns) tr.append(h("td", "", formatNumber(r[c])));
      tbody.append(tr);
    }
    table.append(thead, tbody);
    table.dataset.rows = String(rows.length);
    table.dataset.epochs = String(s.history_total);
    tableWrap.replaceChildren(table);
    if (rows.length < s.history_total) {
      tableWrap.append(h("div", "aiaas-note", `${rows.length} of ${s.history_total} epochs shown, evenly spaced`));
    }
    if (follow) tableWrap.scrollTop = tableWrap.scrollHeight;
  }

  const views = viewsOf.get(model) || new Set();
  viewsOf.set(model, views);
  // JupyterLab re-renders an output when its snapshot is refreshed, leaving the old view's
  // element detached but its listeners alive: release those here.
  for (const old of views) if (!old.el.isConnected) old.cleanup();

  const onChange = () => {
    state = decodeState(model.get("state"));
    receivedAt = performance.now();
    draw();
  };
  stop.addEventListener("click", () => {
    clickedAt = performance.now();
    model.send({ type: "stop" });
    draw();
  });
  model.on("change:state", onChange);
  // Elapsed time and the Stop hint move between messages too.
  const timer = setInterval(() => {
    if (state && (state.status === "running" || state.status === "starting")) draw();
  }, 1000);
  const record = {
    el,
    cleanup() {
      clearInterval(timer);
      resized.disconnect();
      model.off("change:state", onChange);
      views.delete(record);
    },
  };
  views.add(record);
  draw();
  return () => record.cleanup();
}

export default { render };

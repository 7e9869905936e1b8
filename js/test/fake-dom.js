// A tiny stand-in for the browser DOM: just what widget.js and chart.js touch, so their unit tests
// run in plain node without jsdom. Also used by tests/test_widget.py to learn, from the real
// widget.js, which message the Stop button sends to the kernel.

export class FakeElement {
  /** @param {string} tag @param {string | null} ns */
  constructor(tag, ns = null) {
    this.tagName = tag.toUpperCase();
    this.namespaceURI = ns;
    /** @type {FakeElement[]} */
    this.children = [];
    /** @type {FakeElement | null} */
    this.parentNode = null;
    /** @type {Record<string, string>} */
    this.attributes = {};
    /** @type {Record<string, string>} */
    this.dataset = {};
    /** @type {Record<string, string>} */
    this.style = {};
    this.className = "";
    this.hidden = false;
    this.disabled = false;
    this.scrollTop = 0;
    this.clientHeight = 0;
    this.scrollHeight = 0;
    this.connected = false; // set on a root to play "attached to the page"
    /** @type {Record<string, Function[]>} */
    this.listeners = {};
    this.ownText = "";
  }

  get textContent() {
    return this.ownText + this.children.map((c) => c.textContent).join("");
  }

  set textContent(value) {
    this.children = [];
    this.ownText = String(value);
  }

  get isConnected() {
    /** @type {FakeElement | null} */
    let node = this;
    while (node.parentNode) node = node.parentNode;
    return node.connected;
  }

  /** @param {...FakeElement} nodes */
  append(...nodes) {
    for (const node of nodes) {
      node.parentNode = this;
      this.children.push(node);
    }
  }

  /** @param {...FakeElement} nodes */
  replaceChildren(...nodes) {
    for (const old of this.children) old.parentNode = null;
    this.children = [];
    this.ownText = "";
    this.append(...nodes);
  }

  /** @param {string} name @param {string} value */
  setAttribute(name, value) {
    this.attributes[name] = String(value);
    if (name === "class") this.className = String(value);
  }

  /** @param {string} name */
  getAttribute(name) {
    return name === "class" ? this.className : (this.attributes[name] ?? null);
  }

  /** @param {string} type @param {Function} fn */
  addEventListener(type, fn) {
    (this.listeners[type] ||= []).push(fn);
  }

  click() {
    if (this.disabled) return;
    for (const fn of this.listeners.click || []) fn({ type: "click", target: this });
  }

  /** Every descendant with the class `cls`, in document order. @param {string} cls @returns {FakeElement[]} */
  findAll(cls) {
    const found = [];
    for (const child of this.children) {
      if (child.className.split(/\s+/).includes(cls)) found.push(child);
      found.push(...child.findAll(cls));
    }
    return found;
  }

  /** @param {string} cls */
  find(cls) {
    const [first] = this.findAll(cls);
    if (!first) throw new Error(`no .${cls}`);
    return first;
  }

  /** @param {string} tag */
  findTag(tag) {
    const found = [];
    for (const child of this.children) {
      if (child.tagName === tag.toUpperCase()) found.push(child);
      found.push(...child.findTag(tag));
    }
    return found;
  }
}

let now = 1000; // a page's clock is well past 0 by the time anyone clicks

/** Install the fake `document`, `ResizeObserver` and a settable `performance.now()`. */
export function installFakeDom() {
  globalThis.document = /** @type {any} */ ({
    createElement: (/** @type {string} */ tag) => new FakeElement(tag),
    createElementNS: (/** @type {string} */ ns, /** @type {string} */ tag) => new FakeElement(tag, ns),
  });
  globalThis.ResizeObserver = /** @type {any} */ (class {
    observe() {}
    disconnect() {}
  });
  Object.defineProperty(globalThis, "performance", { value: { now: () => now }, configurable: true, writable: true });
}

/** Move the fake clock on (milliseconds). @param {number} ms */
export function advance(ms) {
  now += ms;
}

/** An anywidget model as widget.js sees it: get/on/off/send, and `set` to play a kernel update. */
export class FakeModel {
  /** @param {Record<string, any>} state */
  constructor(state) {
    this.values = { state };
    /** @type {Record<string, Function[]>} */
    this.handlers = {};
    /** @type {any[]} */
    this.sent = [];
  }

  /** @param {string} key */
  get(key) {
    return this.values[key];
  }

  /** @param {string} event @param {Function} fn */
  on(event, fn) {
    (this.handlers[event] ||= []).push(fn);
  }

  /** @param {string} event @param {Function} fn */
  off(event, fn) {
    this.handlers[event] = (this.handlers[event] || []).filter((f) => f !== fn);
  }

  /** @param {any} content */
  send(content) {
    this.sent.push(content);
  }

  /** @param {Record<string, any>} state */
  set(state) {
    this.values.state = state;
    for (const fn of this.handlers["change:state"] || []) fn();
  }
}

/** Float32 bytes as a DataView at an odd offset, the way message buffers arrive. @param {number[]} values */
export function float32View(values) {
  const data = new Float32Array(values);
  const bytes = new Uint8Array(3 + data.byteLength);
  bytes.set(new Uint8Array(data.buffer), 3);
  return new DataView(bytes.buffer, 3, data.byteLength);
}

/**
 * A state as the kernel's widget sends it: `epochsDone` epochs of `stepsPerEpoch` steps done.
 * @param {Partial<Record<string, any>>} overrides
 * @param {{epochsDone?: number, stepsPerEpoch?: number, columns?: string[]}} [shape]
 */
export function makeState(overrides = {}, { epochsDone = 3, stepsPerEpoch = 10, columns = ["loss", "accuracy", "val_loss", "val_accuracy"] } = {}) {
  const steps = Array.from({ length: epochsDone * stepsPerEpoch }, (_, i) => i + 1);
  const losses = steps.map((s) => 2 / s);
  const rows = [];
  for (let e = 1; e <= epochsDone; e++) rows.push(e, ...columns.map((c, j) => (c.includes("acc") ? 0.5 + e / 10 : 1 / e + j)));
  return {
    status: "completed", reason: "", error: null, stop_requested: false, epochs: epochsDone, start_epoch: 0,
    steps_per_epoch: stepsPerEpoch, epochs_done: epochsDone, epoch_step: stepsPerEpoch, step: steps.length,
    samples: steps.length * 32, loss: losses[losses.length - 1] ?? null, elapsed: 12.5, checkpoint: "",
    losses: float32View([...steps, ...losses]), columns, history: float32View(rows), history_total: epochsDone,
    ...overrides,
  };
}

/**
 * Render the real widget.js into a fake page.
 * @param {Record<string, any>} state
 */
export async function renderWidget(state) {
  installFakeDom();
  const { default: widget } = await import("../src/widget.js");
  const model = new FakeModel(state);
  const page = new FakeElement("body");
  page.connected = true;
  const el = new FakeElement("div");
  page.append(el);
  const cleanup = widget.render({ model, el });
  return { model, el, page, cleanup };
}

/** What the Stop button of a running widget sends: for tests/test_widget.py. */
export async function stopMessage() {
  const { model, el, cleanup } = await renderWidget(makeState({ status: "running", epochs: 100, epochs_done: 1 }));
  el.find("aiaas-stop").click();
  cleanup();
  return model.sent;
}

import { test } from "node:test";
import assert from "node:assert/strict";
import { FakeElement, advance, makeState, renderWidget } from "./fake-dom.js";

test("a finished run: full bars, status line, charts with points, one table row per epoch, no Stop", async (t) => {
  const { el, cleanup } = await renderWidget(makeState());
  t.after(cleanup);
  const root = el.find("aiaas-widget");
  assert.equal(root.dataset.status, "completed");
  assert.equal(el.find("aiaas-status").textContent, "completed after 3 epochs in 0:13");
  assert.equal(el.find("aiaas-epoch-bar").dataset.fraction, "1.0000");
  assert.equal(el.find("aiaas-bar-label").textContent, "epoch 3/3");
  assert.equal(el.find("aiaas-step-bar").dataset.fraction, "1.0000");
  assert.ok(el.find("aiaas-stop").hidden);
  // 30 steps, raw and smoothed, plus 3 epoch dots each for train and val loss
  assert.equal(el.find("aiaas-loss-chart").dataset.points, String(30 + 30 + 3 + 3));
  assert.equal(el.find("aiaas-acc-chart").dataset.points, "6");
  const table = el.find("aiaas-table");
  assert.equal(table.dataset.rows, "3");
  assert.deepEqual(table.findTag("th").map((th) => th.textContent), ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"]);
  assert.deepEqual(table.findTag("tr").slice(1).map((tr) => tr.findTag("td")[0].textContent), ["1", "2", "3"]);
  assert.equal(table.findTag("tr")[2].findTag("td")[2].textContent, "0.7000"); // epoch 2 accuracy
  assert.match(el.find("aiaas-figures").textContent, /^elapsed 0:13 · \S+ samples\/s · loss 0\.0667$/);
});

test("Stop sends one stop message, disables itself, and hints at Interrupt when the kernel is busy", async (t) => {
  const running = makeState({ status: "running", epochs: 100, epochs_done: 1, epoch_step: 4, step: 14 });
  const { model, el, cleanup } = await renderWidget(running);
  t.after(cleanup);
  const stop = el.find("aiaas-stop");
  assert.ok(!stop.hidden && !stop.disabled);
  assert.equal(el.find("aiaas-status").textContent, "running");
  assert.match(el.find("aiaas-figures").textContent, /ETA /);
  stop.click();
  stop.click(); // disabled: a second click sends nothing
  assert.deepEqual(model.sent, [{ type: "stop" }]);
  assert.ok(stop.disabled);
  // No answer from the kernel for over two seconds: the hint names the Interrupt button.
  advance(2500);
  model.set({ ...running, step: 15 });
  assert.match(el.find("aiaas-hint").textContent, /Interrupt button/);
  // The kernel took it: "stopping", then the stopped run, and the hint goes.
  model.set({ ...running, stop_requested: true });
  assert.equal(el.find("aiaas-status").textContent, "stopping at the next step…");
  assert.equal(el.find("aiaas-hint").textContent, "");
  model.set({ ...running, status: "stopped", reason: "stop requested", epochs_done: 2 });
  assert.equal(el.find("aiaas-status").textContent, "stopped after 2 epochs in 0:13 (stop requested)");
  assert.ok(stop.hidden);
});

test("a regression run hides the accuracy chart; a failed run shows its error", async (t) => {
  const state = makeState({ status: "failed", error: "ValueError: bad" }, { epochsDone: 2, columns: ["loss"] });
  const { el, cleanup } = await renderWidget(state);
  t.after(cleanup);
  assert.equal(el.find("aiaas-acc-chart").style.display, "none");
  assert.equal(el.find("aiaas-status").textContent, "failed: ValueError: bad");
  assert.equal(el.find("aiaas-status").className, "aiaas-status aiaas-status-failed");
  assert.equal(el.find("aiaas-table").dataset.rows, "2");
});

test("fewer rows than epochs says so; a resumed run counts only its own epochs", async (t) => {
  const state = makeState({ history_total: 40, epochs: 40, start_epoch: 37, epochs_done: 40 });
  const { el, cleanup } = await renderWidget(state);
  t.after(cleanup);
  assert.equal(el.find("aiaas-note").textContent, "3 of 40 epochs shown, evenly spaced");
  assert.equal(el.find("aiaas-status").textContent, "completed after 3 epochs in 0:13");
});

test("cleanup lets go of the model; a view left detached is released by the next render", async (t) => {
  const first = await renderWidget(makeState());
  assert.equal(first.model.handlers["change:state"].length, 1);
  first.cleanup();
  assert.equal(first.model.handlers["change:state"].length, 0);

  const { default: widget } = await import("../src/widget.js");
  const { model, page } = await renderWidget(makeState({ status: "running" }));
  // JupyterLab re-renders the output: the old view's element leaves the page, a new one is drawn.
  page.replaceChildren();
  const again = new FakeElement("div");
  page.append(again);
  const cleanup = widget.render({ model, el: again });
  t.after(cleanup);
  assert.equal(model.handlers["change:state"].length, 1, "the detached view's listener was released");
  model.set(makeState({ status: "stopped", reason: "stop requested" }));
  assert.equal(again.find("aiaas-status").textContent, "stopped after 3 epochs in 0:13 (stop requested)");
});

// Diff2Flow Bridge — frontend extension (plain ES module, no build step).
//
// * D2FTrain: a live loss chart and a status line (step/total, samples/s, ETA, last save), fed by the
//   server's `d2f.train` messages (kinds start / progress / saved / validation / done), matched to the node by
//   id. With D2FValidation connected: the held-out loss as a second series, Reflow straightness on its own
//   right-hand scale, validation seconds apart from samples/s, and the latest validation grid under the chart.
// * D2FFlowPatch: after the node ran, a read-out of what the patch did (prediction type, σ range),
//   from the node's UI output `d2f_flow_patch`.
//
// Neither widget is saved in the workflow (serialize: false), so widgets_values stay exactly what the
// node definition prescribes.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION = "diff2flow.bridge";
const CHART_HEIGHT = 170;
const READOUT_HEIGHT = 58;
const COUPLINGS_HEIGHT = 74; // four lines of the couplings read-out
const GRID_HEIGHT = 190;
const COLORS = { raw: "rgba(110,160,255,0.45)", ema: "#ffb347", val: "#5fd38d", straight: "#c792ea" };

// ComfyUI serves this folder twice (once per name the pack declares: WEB_DIRECTORY and
// pyproject [tool.comfy] web), so this module can be evaluated twice. Register once.
const already = window.__d2fBridge || (app.extensions || []).some((e) => e.name === EXTENSION);

// --------------------------------------------------------------------------------------------
// state of each training node, kept by node id (string), survives graph reloads
// --------------------------------------------------------------------------------------------
const runs = new Map();

function runFor(nodeId) {
  const key = String(nodeId);
  if (!runs.has(key)) {
    runs.set(key, { losses: [], startStep: 0, step: 0, total: 0, sps: null, eta: null, lastSave: null, status: "idle",
                    val: [], straight: [], valSeconds: 0, grid: null, gridStep: null, skipped: [] });
  }
  return runs.get(key);
}

function fmtSeconds(s) {
  if (s === null || s === undefined || !isFinite(s)) return "–";
  s = Math.max(0, Math.round(s));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  const mm = String(m).padStart(h ? 2 : 1, "0"), ss = String(sec).padStart(2, "0");
  return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
}

// A fixed-height DOM widget that only displays: never saved into the workflow's widgets_values.
function addDisplayWidget(node, name, element, height) {
  const widget = node.addDOMWidget(name, name, element, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => "",
    setValue: () => {},
    getMinHeight: () => height,
    getMaxHeight: () => height,
  });
  widget.serialize = false;
  return widget;
}

function baseName(path) {
  if (!path) return "";
  const parts = String(path).split(/[\\/]/);
  return parts[parts.length - 1];
}

function statusText(run) {
  if (run.status === "idle") return "Diff2Flow: queue the workflow to train; the loss is drawn here.";
  const parts = [`step ${run.step}/${run.total}`];
  if (run.sps) parts.push(`${run.sps.toFixed(2)} samples/s`);
  if (run.status === "running") parts.push(`ETA ${fmtSeconds(run.eta)}`);
  if (run.losses.length) parts.push(`loss ${run.losses[run.losses.length - 1].toPrecision(4)}`);
  const lastVal = run.val.length ? run.val[run.val.length - 1] : null;
  if (lastVal && lastVal.loss !== null) parts.push(`held-out ${lastVal.loss.toPrecision(4)}`);
  if (run.val.length) parts.push(`validation ${run.valSeconds.toFixed(1)} s`);
  if (run.lastSave) parts.push(`saved ${baseName(run.lastSave)}`);
  if (run.status !== "running") parts.unshift(run.status === "done" ? "done" : run.status);
  return parts.join(" · ");
}

// --------------------------------------------------------------------------------------------
// the chart
// --------------------------------------------------------------------------------------------
function drawChart(canvas, run) {
  const dpr = window.devicePixelRatio || 1;
  const w = Math.max(120, canvas.clientWidth || 300), h = Math.max(60, canvas.clientHeight || CHART_HEIGHT - 30);
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.fillStyle = "#1b1b1f";
  ctx.fillRect(0, 0, w, h);
  const pad = { l: 44, r: 8, t: 8, b: 16 };
  const losses = run.losses.filter((v) => isFinite(v));
  const val = run.val.filter((p) => p.loss !== null && isFinite(p.loss));
  const straight = run.straight.filter((p) => p.value !== null && isFinite(p.value));
  canvas.dataset.points = String(losses.length);
  canvas.dataset.valPoints = String(val.length);
  canvas.dataset.straightPoints = String(straight.length);
  if (straight.length) pad.r = 34;  // room for straightness's own scale
  const pw = w - pad.l - pad.r, ph = h - pad.t - pad.b;
  ctx.strokeStyle = "#444";
  ctx.lineWidth = 1;
  ctx.strokeRect(pad.l + 0.5, pad.t + 0.5, pw, ph);
  ctx.font = "10px sans-serif";
  ctx.fillStyle = "#999";
  if (!losses.length && !val.length) {
    ctx.fillText("loss", pad.l + 6, pad.t + 14);
    return;
  }
  const all = losses.concat(val.map((p) => p.loss));
  let lo = Math.min(...all), hi = Math.max(...all);
  if (hi - lo < 1e-12) { hi += 1e-6; lo -= 1e-6; }
  const n = losses.length;
  const totalSteps = Math.max(run.total - run.startStep, n, 2);
  const x = (i) => pad.l + (pw * i) / Math.max(totalSteps - 1, 1);
  const y = (v) => pad.t + ph - (ph * (v - lo)) / (hi - lo);
  ctx.textAlign = "right";
  ctx.fillText(hi.toPrecision(3), pad.l - 4, pad.t + 8);
  ctx.fillText(lo.toPrecision(3), pad.l - 4, pad.t + ph);
  ctx.textAlign = "left";
  ctx.fillText(`step ${run.startStep}`, pad.l, h - 3);
  ctx.textAlign = "right";
  ctx.fillText(`${run.total}`, pad.l + pw, h - 3);
  ctx.textAlign = "left";
  // raw losses
  ctx.strokeStyle = COLORS.raw;
  ctx.beginPath();
  losses.forEach((v, i) => (i ? ctx.lineTo(x(i), y(v)) : ctx.moveTo(x(i), y(v))));
  if (n === 1) ctx.arc(x(0), y(losses[0]), 2, 0, 2 * Math.PI);
  ctx.stroke();
  // exponential moving average
  const beta = n > 20 ? 0.9 : 0.6;
  let ema = losses[0];
  ctx.strokeStyle = COLORS.ema;
  ctx.lineWidth = 2;
  ctx.beginPath();
  losses.forEach((v, i) => {
    ema = i ? beta * ema + (1 - beta) * v : v;
    i ? ctx.lineTo(x(i), y(ema)) : ctx.moveTo(x(i), y(ema));
  });
  ctx.stroke();
  // held-out loss (D2FValidation): the value after step s sits where training loss s does
  const xs = (step) => x(step - run.startStep - 1);
  drawSeries(ctx, val.map((p) => [xs(p.step), y(p.loss)]), COLORS.val, []);
  // straightness on its own scale, 0 at the bottom
  if (straight.length) {
    const top = Math.max(...straight.map((p) => p.value)) * 1.1 || 1;
    const ys = (v) => pad.t + ph - (ph * v) / top;
    drawSeries(ctx, straight.map((p) => [xs(p.step), ys(p.value)]), COLORS.straight, [4, 3]);
    ctx.fillStyle = COLORS.straight;
    ctx.textAlign = "left";
    ctx.fillText(top.toPrecision(2), pad.l + pw + 3, pad.t + 8);
    ctx.fillText("0", pad.l + pw + 3, pad.t + ph);
  }
  drawLegend(ctx, pad.l + pw - 4, pad.t + 12, [["train", COLORS.raw], ["smoothed", COLORS.ema]]
    .concat(val.length ? [["held-out", COLORS.val]] : [])
    .concat(straight.length ? [["straightness", COLORS.straight]] : []));
}

function drawSeries(ctx, points, color, dash) {
  if (!points.length) return;
  ctx.strokeStyle = color;
  ctx.fillStyle = color;
  ctx.lineWidth = 2;
  ctx.setLineDash(dash);
  ctx.beginPath();
  points.forEach(([px, py], i) => (i ? ctx.lineTo(px, py) : ctx.moveTo(px, py)));
  ctx.stroke();
  ctx.setLineDash([]);
  for (const [px, py] of points) {
    ctx.beginPath();
    ctx.arc(px, py, 2.5, 0, 2 * Math.PI);
    ctx.fill();
  }
}

// Right-aligned legend, one line per series: a colour swatch and its name.
function drawLegend(ctx, right, top, entries) {
  ctx.font = "10px sans-serif";
  ctx.textAlign = "right";
  entries.forEach(([label, color], i) => {
    const yy = top + 12 * i;
    ctx.fillStyle = "#bbb";
    ctx.fillText(label, right - 14, yy);
    ctx.fillStyle = color;
    ctx.fillRect(right - 10, yy - 6, 10, 4);
  });
  ctx.textAlign = "left";
}

function makePanel(className) {
  const root = document.createElement("div");
  root.className = className;
  root.style.cssText = "display:flex;flex-direction:column;gap:4px;width:100%;height:100%;box-sizing:border-box;" +
    "font:11px sans-serif;color:#ccc;overflow:hidden;";
  return root;
}

function addTrainingWidget(node) {
  if (node.d2fChart) return;
  const root = makePanel("d2f-train-panel");
  const status = document.createElement("div");
  status.className = "d2f-train-status";
  status.style.cssText = "flex:0 0 auto;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;";
  const canvas = document.createElement("canvas");
  canvas.className = "d2f-loss-chart";
  canvas.style.cssText = "flex:1 1 auto;min-height:60px;width:100%;border-radius:4px;display:block;";
  root.append(status, canvas);
  const widget = addDisplayWidget(node, "d2f_loss_chart", root, CHART_HEIGHT);
  node.d2fChart = { root, canvas, status, widget };
  fitNode(node);
  refreshNode(node);
}

// The latest validation grid (rows: images, columns: step counts), a PNG in the run's folder under output/.
function showValidationGrid(node, run) {
  if (!run.grid) return;
  if (!node.d2fGrid) {
    const root = makePanel("d2f-validation-panel");
    const caption = document.createElement("div");
    caption.className = "d2f-validation-caption";
    caption.style.cssText = "flex:0 0 auto;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;";
    const img = document.createElement("img");
    img.className = "d2f-validation-grid";
    img.style.cssText = "flex:1 1 auto;min-height:0;width:100%;object-fit:contain;image-rendering:pixelated;" +
      "background:#1b1b1f;border-radius:4px;";
    root.append(caption, img);
    addDisplayWidget(node, "d2f_validation_grid", root, GRID_HEIGHT);
    node.d2fGrid = { root, caption, img };
    fitNode(node);
  }
  const g = run.grid;
  const params = new URLSearchParams({ filename: g.filename, subfolder: g.subfolder || "", type: g.type || "output" });
  const src = api.apiURL(`/view?${params}`);
  if (node.d2fGrid.img.dataset.src !== src) {
    node.d2fGrid.img.dataset.src = src;
    node.d2fGrid.img.src = src;
  }
  node.d2fGrid.root.dataset.step = String(run.gridStep);
  const skipped = run.skipped.length ? ` · skipped ${run.skipped.join(", ")} (time cap)` : "";
  node.d2fGrid.caption.textContent = `validation grid, step ${run.gridStep} · columns: ${g.steps.join(", ")} steps${skipped}`;
}

// Grow (never shrink) a node to what its widgets need: a saved size may predate our widgets.
function fitNode(node) {
  const sz = node.computeSize?.();
  if (sz && (node.size[0] < sz[0] || node.size[1] < sz[1])) {
    node.setSize([Math.max(node.size[0], sz[0]), Math.max(node.size[1], sz[1])]);
  }
}

function refreshNode(node) {
  if (!node.d2fChart) return;
  const run = runFor(node.id);
  node.d2fChart.status.textContent = statusText(run);
  node.d2fChart.root.dataset.status = run.status;
  node.d2fChart.root.dataset.step = String(run.step);
  drawChart(node.d2fChart.canvas, run);
  showValidationGrid(node, run);
  node.setDirtyCanvas?.(true, true);
}

function findNode(id) {
  const graph = app.rootGraph || app.graph;
  if (!graph) return null;
  const key = String(id);
  let node = graph.getNodeById?.(Number(key)) || graph.getNodeById?.(key);
  if (!node && key.includes(":")) node = graph.getNodeById?.(Number(key.split(":").pop()));
  return node && node.type === "D2FTrain" ? node : null;
}

function onTrainEvent(event) {
  const d = event.detail || {};
  if (d.node === undefined || d.node === null) return;
  const run = runFor(d.node);
  if (typeof d.total === "number") run.total = d.total;
  if (typeof d.step === "number") run.step = d.step;
  switch (d.kind) {
    case "start":
      run.losses = [];
      run.startStep = d.step || 0;
      run.sps = null;
      run.eta = null;
      run.lastSave = null;
      run.status = "running";
      run.val = [];
      run.straight = [];
      run.valSeconds = 0;
      run.skipped = [];
      break;
    case "validation":
      run.val.push({ step: d.step, loss: d.loss === null ? null : Number(d.loss) });
      if (d.straightness !== null && d.straightness !== undefined) run.straight.push({ step: d.step, value: Number(d.straightness) });
      if (typeof d.total_seconds === "number") run.valSeconds = d.total_seconds;
      run.skipped = Array.isArray(d.skipped) ? d.skipped : [];
      if (d.grid) {
        run.grid = d.grid;
        run.gridStep = d.step;
      }
      break;
    case "progress":
      run.status = "running";
      if (Array.isArray(d.losses)) run.losses.push(...d.losses.map(Number));
      if (d.samples_per_second) run.sps = d.samples_per_second;
      run.eta = d.eta_seconds;
      if (d.last_save) run.lastSave = d.last_save;
      break;
    case "saved":
      run.lastSave = d.path || run.lastSave;
      break;
    case "done":
      run.status = d.status || "done";
      run.eta = 0;
      if (d.last_save) run.lastSave = d.last_save;
      break;
  }
  const node = findNode(d.node);
  if (node) {
    addTrainingWidget(node);
    refreshNode(node);
  }
}

// --------------------------------------------------------------------------------------------
// flow patch read-out
// --------------------------------------------------------------------------------------------
function readoutText(info) {
  const pred = { eps: "ε-prediction", v_prediction: "v-prediction", x0: "x0-prediction" }[info.prediction] || info.prediction;
  const how = info.requested === "auto" ? "detected" : "set";
  const lines = [
    `${info.family ? info.family + ": " : ""}${pred}${info.zsnr ? " + zsnr" : ""} (${how}) → flow`,
    `σ ${Number(info.sigma_max).toFixed(4)} → ${Number(info.sigma_min).toFixed(4)} (ς ${Number(info.base_sigma_max).toPrecision(4)} → ${Number(info.base_sigma_min).toPrecision(3)})`,
  ];
  if (info.label_offset) lines.push(`label offset ${info.label_offset}`);
  return lines.join("\n");
}

// A text block under a node's widgets, made once per node (kept as node[field]) and refilled on each run.
function showTextReadout(node, field, name, color, height, text) {
  if (!node[field]) {
    const el = document.createElement("div");
    el.className = name.replaceAll("_", "-");
    el.style.cssText = `white-space:pre;font:11px monospace;color:${color};padding:2px 4px;overflow:hidden;`;
    addDisplayWidget(node, name, el, height);
    node[field] = el;
  }
  fitNode(node);
  node[field].textContent = text;
  node.setDirtyCanvas?.(true, true);
  return node[field];
}

function showPatchReadout(node, info) {
  const el = showTextReadout(node, "d2fReadout", "d2f_patch_readout", "#9fd49f", READOUT_HEIGHT, readoutText(info));
  el.dataset.prediction = info.prediction;
}

// --------------------------------------------------------------------------------------------
// Reflow couplings read-out (D2FReflowPairs, D2FLoadReflowPairs)
// --------------------------------------------------------------------------------------------
function couplingsText(info) {
  const pred = { eps: "ε", v_prediction: "v", x0: "x0" }[info.prediction] || info.prediction || "?";
  const [c, h, w] = info.latent || [];
  const lines = [
    `${info.pairs} pairs · ${info.prompts} prompt${info.prompts === 1 ? "" : "s"} · ${info.folder || ""}`,
    `${info.model_type || "?"} (${pred}) · latent ${c}×${h}×${w}`,
    `${info.sampler || "?"} ${info.steps} steps · cfg ${info.cfg} · shift ${info.shift} · seed ${info.seed}`,
  ];
  if (info.model) lines.push(`model ${info.model}${info.pack_version ? " · pack " + info.pack_version : ""}`);
  return lines.join("\n");
}

function showCouplingsReadout(node, info) {
  showTextReadout(node, "d2fCouplings", "d2f_couplings_readout", "#9fc3d4", COUPLINGS_HEIGHT, couplingsText(info));
}

// --------------------------------------------------------------------------------------------
if (!already) {
  window.__d2fBridge = { runs, readoutText, couplingsText, statusText };
  app.registerExtension({
    name: EXTENSION,
    async setup() {
      api.addEventListener("d2f.train", onTrainEvent);
    },
    async beforeRegisterNodeDef(nodeType, nodeData) {
      if (nodeData.name === "D2FTrain") {
        const created = nodeType.prototype.onNodeCreated;
        nodeType.prototype.onNodeCreated = function () {
          const r = created?.apply(this, arguments);
          addTrainingWidget(this);
          return r;
        };
      } else if (nodeData.name === "D2FReflowPairs" || nodeData.name === "D2FLoadReflowPairs") {
        const executed = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (output) {
          const r = executed?.apply(this, arguments);
          const info = output?.d2f_couplings?.[0];
          if (info) showCouplingsReadout(this, info);
          return r;
        };
      } else if (nodeData.name === "D2FFlowPatch") {
        const executed = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (output) {
          const r = executed?.apply(this, arguments);
          const info = output?.d2f_flow_patch?.[0];
          if (info) showPatchReadout(this, info);
          return r;
        };
      }
    },
    async loadedGraphNode(node) {
      if (node.type === "D2FTrain") {
        fitNode(node);
        refreshNode(node);
      }
    },
  });
}

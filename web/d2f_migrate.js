// Diff2Flow Bridge — loads workflows saved by earlier versions of the pack (issue 12).
//
// D2FTrain's rarely changed settings moved to option nodes (D2FTrainAdvanced, D2FScheduledSampling). A saved
// workflow keeps widget values by position, so an old D2FTrain would load with its values shifted onto the wrong
// widgets. legacy_widgets.json (shared with d2f_host/migrate.py, which does the same for `d2f run`) lists the old
// layouts and where each setting went. On load:
//   * beforeConfigureGraph: an old D2FTrain (known by its number of values) gives up its positional values,
//     kept here by name, so that the graph loads it with its defaults rather than with shifted values;
//   * afterConfigureGraph: its current widgets get their old values by name, and each moved group whose values
//     differ from the option node's defaults gets that option node, holding them, linked to D2FTrain's input.
//     Groups at their defaults need none: an unconnected input means exactly those defaults.
// The run is the one the old workflow ran; saving the workflow stores the new layout.

import { app } from "../../scripts/app.js";

const EXTENSION = "diff2flow.migrate";
const TABLE_URL = new URL("./legacy_widgets.json", import.meta.url);
const GAP = 40;

// Served under two names (WEB_DIRECTORY and pyproject's [tool.comfy] web): register once.
const already = window.__d2fMigrate || (app.extensions || []).some((e) => e.name === EXTENSION);

let tablePromise = null;
function legacyTable() {
  tablePromise ??= fetch(TABLE_URL).then((r) => (r.ok ? r.json() : {})).catch(() => ({}));
  return tablePromise;
}

// An old node's values by name, or null when `saved` is not one of the type's old layouts.
function legacyValues(entry, saved) {
  if (!entry || !Array.isArray(saved)) return null;
  const layout = entry.layouts.find((l) => l.widgets.length === saved.length);
  if (!layout) return null;
  const values = Object.fromEntries(layout.widgets.map((name, i) => [name, saved[i]]));
  return values.mode === "lora" || values.mode === "full" ? values : null;
}

const pending = new Map(); // node id → { type, values by old name }

function migrateNode(graph, node, entry, byName) {
  for (const w of node.widgets ?? []) {
    if (Object.hasOwn(byName, w.name)) w.value = byName[w.name];
  }
  // The node lost most of its rows: draw it at its new size, the option nodes below it.
  const fit = node.computeSize();
  node.setSize([Math.max(node.size[0], fit[0]), fit[1]]);
  let top = node.pos[1] + node.size[1] + GAP;
  for (const [type, spec] of Object.entries(entry.moved)) {
    const slot = node.findInputSlot(spec.input);
    if (slot < 0 || node.inputs[slot].link != null) continue;
    const values = {};
    for (const [old, name] of Object.entries(spec.widgets)) {
      if (Object.hasOwn(byName, old)) values[name] = byName[old];
    }
    const option = globalThis.LiteGraph.createNode(type);
    if (!option) continue; // the pack's option node is not installed: nothing to hold the values
    if (!(option.widgets ?? []).some((w) => Object.hasOwn(values, w.name) && values[w.name] !== w.value)) continue;
    for (const w of option.widgets) {
      if (Object.hasOwn(values, w.name)) w.value = values[w.name];
    }
    option.pos = [node.pos[0], top];
    graph.add(option);
    option.connect(0, node, slot);
    top += option.size[1] + GAP + 30;
  }
}

if (!already) {
  window.__d2fMigrate = { legacyValues };
  app.registerExtension({
    name: EXTENSION,
    async beforeConfigureGraph(graphData) {
      pending.clear();
      const nodes = graphData?.nodes ?? [];
      if (!nodes.some((n) => n.type === "D2FTrain")) return;
      const table = await legacyTable();
      for (const node of nodes) {
        const byName = legacyValues(table[node.type], node.widgets_values);
        if (!byName) continue;
        delete node.widgets_values; // loaded with its defaults; afterConfigureGraph sets each value by name
        pending.set(node.id, { entry: table[node.type], byName });
      }
    },
    async afterConfigureGraph() {
      if (!pending.size) return;
      const graph = app.rootGraph ?? app.graph;
      for (const [id, { entry, byName }] of pending) {
        const node = graph.getNodeById(id);
        if (node) migrateNode(graph, node, entry, byName);
      }
      pending.clear();
      graph.setDirtyCanvas?.(true, true);
    },
  });
}

"""Saved workflows of earlier versions → the current nodes (issue 12: D2FTrain's rarely changed settings moved to
option nodes).

A UI-format workflow stores a node's widget values by position (``widgets_values``), so a D2FTrain saved with the
old, longer widget list would load with its values shifted onto the wrong widgets. ``web/legacy_widgets.json``
lists the old layouts and where each moved setting went; this module and ``web/d2f_migrate.js`` (the frontend,
when a graph loads) apply it the same way:

- the old values are read by name (the layout is known by its length) and the D2FTrain keeps those of its
  current widgets, in its current order;
- for each group of moved settings (D2FTrainAdvanced, D2FScheduledSampling) whose values differ from that node's
  defaults, an option node holding them is added and linked to D2FTrain's input; a group left at its defaults
  needs no node, since an unconnected input means exactly those defaults. The run is the one the old workflow ran.

API-format prompts (scripts, ``d2f run`` of a saved prompt) carried the settings as D2FTrain inputs by name; the
executor drops inputs a node no longer defines, so they are moved the same way (:func:`migrate_prompt`).
"""

from __future__ import annotations

import copy
import functools
import json
import os

from .workflow import default_widget_value, input_specs, output_names, output_types, widget_specs

TABLE_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "web", "legacy_widgets.json")
GAP = 40  # between a migrated D2FTrain and the option nodes placed below it


@functools.lru_cache(maxsize=1)
def table() -> dict:
    with open(TABLE_PATH, encoding="utf-8") as f:
        return json.load(f)


def legacy_values(node_type: str, saved) -> dict | None:
    """An old node's saved widget values by name, or None when ``saved`` is not an old layout of this type."""
    entry = table().get(node_type)
    if entry is None or not isinstance(saved, list):
        return None
    for layout in entry["layouts"]:
        names = layout["widgets"]
        if len(names) == len(saved):
            values = dict(zip(names, saved))
            # the first widget of every layout is mode: a sanity check against an unrelated list of this length
            return values if values.get("mode") in ("lora", "full") else None
    return None


def _value_defaults(node_def: dict) -> dict:
    return {w.name: default_widget_value(w) for w in widget_specs(node_def) if w.kind == "value"}


def option_values(node_type: str, by_name: dict, defs: dict) -> dict[str, dict]:
    """option node type → {its widget: value} for each moved group with a value other than the node's default."""
    out = {}
    for option_type, spec in table()[node_type]["moved"].items():
        defaults = _value_defaults(defs[option_type])
        values = {new: by_name[old] for old, new in spec["widgets"].items() if old in by_name}
        if any(values[k] != defaults.get(k) for k in values):
            out[option_type] = dict(defaults, **values)
    return out


# ---------------------------------------------------------------------------------------------
# UI format
# ---------------------------------------------------------------------------------------------
def _add_link(workflow: dict, link_id: int, origin: int, target: int, slot: int, typ: str) -> None:
    links = workflow.setdefault("links", [])
    if links and isinstance(links[0], dict):
        links.append({"id": link_id, "origin_id": origin, "origin_slot": 0, "target_id": target, "target_slot": slot,
                      "type": typ})
    else:
        links.append([link_id, origin, 0, target, slot, typ])


def migrate_workflow(workflow: dict, defs: dict) -> dict:
    """A copy of a UI-format workflow with every old-layout D2FTrain moved to the current inputs (the workflow
    itself when there is none). Needs the node definitions (``/object_info``) of D2FTrain and its option nodes."""
    nodes = workflow.get("nodes") or []
    olds = [n for n in nodes if n.get("type") in table() and n.get("type") in defs
            and legacy_values(n["type"], n.get("widgets_values")) is not None]
    if not olds:
        return workflow
    workflow = copy.deepcopy(workflow)
    links = workflow.get("links") or []
    next_node = max([workflow.get("last_node_id") or 0] + [n["id"] for n in workflow["nodes"]]) + 1
    next_link = max([workflow.get("last_link_id") or 0] + [(l["id"] if isinstance(l, dict) else l[0]) for l in links]) + 1
    for node in (n for n in workflow["nodes"] if n["id"] in {o["id"] for o in olds}):
        typ = node["type"]
        by_name = legacy_values(typ, node["widgets_values"])
        node["widgets_values"] = [
            by_name.get(w.name if w.kind == "value" else "control_after_generate", default_widget_value(w))
            for w in widget_specs(defs[typ])]
        top = node["pos"][1] + node["size"][1] + GAP
        for option_type, values in option_values(typ, by_name, defs).items():
            option_def = defs[option_type]
            input_name = table()[typ]["moved"][option_type]["input"]
            inputs = node.setdefault("inputs", [])
            slot = next((i for i, inp in enumerate(inputs) if inp.get("name") == input_name), None)
            if slot is None:
                spec = next(s for s in input_specs(defs[typ]) if s.name == input_name)
                inputs.append({"name": input_name, "type": spec.type, "shape": 7, "link": None})
                slot = len(inputs) - 1
            if inputs[slot].get("link") is not None:
                continue  # already fed (cannot happen in an old layout; never overwrite a link)
            out_type = output_types(option_def)[0]
            specs = widget_specs(option_def)
            height = 30 * len(specs) + 30
            workflow["nodes"].append({
                "id": next_node, "type": option_type, "pos": [node["pos"][0], top], "size": [315, height],
                "flags": {}, "order": len(workflow["nodes"]), "mode": 0, "inputs": [],
                "outputs": [{"name": output_names(option_def)[0], "type": out_type, "links": [next_link]}],
                "properties": {"Node name for S&R": option_type},
                "widgets_values": [values[w.name] for w in specs]})
            inputs[slot]["link"] = next_link
            _add_link(workflow, next_link, next_node, node["id"], slot, out_type)
            top += height + 30 + GAP
            next_node += 1
            next_link += 1
    workflow["last_node_id"] = next_node - 1
    workflow["last_link_id"] = next_link - 1
    return workflow


# ---------------------------------------------------------------------------------------------
# API format
# ---------------------------------------------------------------------------------------------
def migrate_prompt(prompt: dict, defs: dict) -> dict:
    """A copy of an API-format prompt whose D2FTrain entries carry no moved setting: each group that differs from
    its defaults becomes an option node entry (a new numeric id) linked to D2FTrain's input."""
    moved_somewhere = any(entry.get("class_type") in table() and entry.get("class_type") in defs and any(
        old in entry.get("inputs", {}) for spec in table()[entry["class_type"]]["moved"].values() for old in spec["widgets"])
        for entry in prompt.values())
    if not moved_somewhere:
        return prompt
    prompt = copy.deepcopy(prompt)
    numeric = [int(k) for k in prompt if str(k).isdigit()]
    next_id = max(numeric, default=0) + 1
    for node_id, entry in list(prompt.items()):
        typ = entry.get("class_type")
        if typ not in table() or typ not in defs:
            continue
        inputs = entry.setdefault("inputs", {})
        by_name = {old: inputs.pop(old) for spec in table()[typ]["moved"].values() for old in spec["widgets"]
                   if old in inputs}
        for option_type, values in option_values(typ, by_name, defs).items():
            input_name = table()[typ]["moved"][option_type]["input"]
            if input_name in inputs:
                continue  # already fed: the option node's values win
            prompt[str(next_id)] = {"inputs": values, "class_type": option_type,
                                    "_meta": {"title": defs[option_type].get("display_name") or option_type}}
            inputs[input_name] = [str(next_id), 0]
            next_id += 1
    return prompt


def route_override(prompt: dict, selector: str, name: str, value, defs: dict) -> int:
    """``--set D2FTrain.training_dtype=fp32`` and the like: a setting that moved to an option node, set on the
    node feeding that D2FTrain's input, or on a new one (defaults plus this value) linked to it. The setting is
    named as it was on D2FTrain (``ss_probability``) or as on its option node (``probability``, also a setting the
option node gained later, such as ``sharding``). Returns how many
    nodes it reached (in place)."""
    hits = 0
    for node_id, entry in list(prompt.items()):
        typ = entry.get("class_type")
        if typ not in table() or typ not in defs or selector not in (
                node_id, typ, (entry.get("_meta") or {}).get("title")):
            continue
        for option_type, spec in table()[typ]["moved"].items():
            new = spec["widgets"].get(name) or (name if name in spec["widgets"].values()
                                                or name in _value_defaults(defs[option_type]) else None)
            if new is None:
                continue
            inputs = entry.setdefault("inputs", {})
            fed = inputs.get(spec["input"])
            if isinstance(fed, list) and len(fed) == 2 and (prompt.get(fed[0]) or {}).get("class_type") == option_type:
                prompt[fed[0]]["inputs"][new] = value
            else:
                option_id = str(max([int(k) for k in prompt if str(k).isdigit()], default=0) + 1)
                prompt[option_id] = {"inputs": dict(_value_defaults(defs[option_type]), **{new: value}),
                                     "class_type": option_type,
                                     "_meta": {"title": defs[option_type].get("display_name") or option_type}}
                inputs[spec["input"]] = [option_id, 0]
            hits += 1
    return hits

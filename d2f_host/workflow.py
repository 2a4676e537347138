"""UI-format workflows (what ComfyUI's frontend saves) → API-format prompts (what its server runs).

The conversion follows the frontend's ``graphToPrompt`` (comfyui-frontend-package 1.49, the one
ComfyUI v0.33.0 pins):

- virtual nodes (``Note``, ``MarkdownNote``, ``Reroute``, ``PrimitiveNode``) are not sent; muted
  (mode 2) and bypassed (mode 4) nodes are not sent either; a link from a bypassed node is routed
  through the bypassed node's input of the same type, a link through a ``Reroute`` to its source,
  a link from a ``PrimitiveNode`` becomes that primitive's value;
- each widget is sent under its name, in the order the frontend creates widgets from the node's
  definition (``/object_info``): inputs in ``input_order`` (required, then optional), one widget per
  INT/FLOAT/STRING/BOOLEAN/COMBO input that is not ``forceInput``, followed by a
  ``control_after_generate`` widget where the spec asks for one and an ``upload`` widget for
  ``image_upload``-style combos; the last two are saved in ``widgets_values`` but never sent;
- a linked input is sent as ``[origin_id, origin_slot]`` (over the widget of the same name), array
  widget values as ``{"__value__": [...]}``, the node's title in ``_meta``; links to nodes that are
  not sent are dropped.

Everything here is plain Python over JSON: node definitions come in as the ``/object_info`` dict
(``d2f_host.host.object_info()`` builds it in-process from a booted host).
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field

VIRTUAL_NODE_TYPES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload", "file_upload")
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
SEED_NAMES = ("seed", "noise_seed")


class WorkflowError(ValueError):
    """A workflow that cannot be converted or run, with the node it concerns in the message."""


# ---------------------------------------------------------------------------------------------
# node definitions → widgets
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpec:
    name: str
    type: str  # "COMBO" for combos (legacy list-typed specs included)
    options: dict
    required: bool
    combo_values: tuple | None = None

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.options.get("forceInput", False)


@dataclass(frozen=True)
class WidgetSpec:
    name: str
    kind: str  # "value", "control" (control_after_generate) or "upload"
    input: InputSpec

    @property
    def serialized(self) -> bool:
        """Sent to the server (``graphToPrompt``); control and upload widgets are UI-only."""
        return self.kind == "value"


def input_specs(node_def: dict) -> list[InputSpec]:
    """The node's inputs (hidden ones excluded) in the frontend's order."""
    spec_sections = node_def.get("input", {})
    order = node_def.get("input_order") or {k: list(v.keys()) for k, v in spec_sections.items()}
    out = []
    for section in ("required", "optional"):
        specs = spec_sections.get(section) or {}
        for name in order.get(section, specs.keys()):
            if name not in specs:
                continue
            raw = specs[name]
            typ = raw[0] if isinstance(raw, (list, tuple)) and raw else raw
            opts = raw[1] if isinstance(raw, (list, tuple)) and len(raw) > 1 and isinstance(raw[1], dict) else {}
            combo = None
            if isinstance(typ, (list, tuple)):
                combo, typ = tuple(typ), "COMBO"
            elif typ == "COMBO":
                combo = tuple(opts.get("options", ()))
            out.append(InputSpec(name, str(typ), dict(opts), section == "required", combo))
    return out


def has_control_widget(spec: InputSpec) -> bool:
    """The frontend adds a ``control_after_generate`` widget after INT widgets whose spec asks for one
    or, when the spec does not say, that are named ``seed`` / ``noise_seed``; after FLOAT and COMBO
    widgets only when asked."""
    flag = spec.options.get("control_after_generate")
    if spec.type == "INT":
        return bool(flag if flag is not None else spec.name in SEED_NAMES)
    return spec.type in ("FLOAT", "COMBO") and bool(flag)


def widget_specs(node_def: dict) -> list[WidgetSpec]:
    """The widgets the frontend creates for a node, in ``widgets_values`` order."""
    widgets = []
    for spec in input_specs(node_def):
        if not spec.is_widget:
            continue
        widgets.append(WidgetSpec(spec.name, "value", spec))
        if has_control_widget(spec):
            widgets.append(WidgetSpec("control_after_generate", "control", spec))
        if spec.type == "COMBO" and any(spec.options.get(flag) for flag in UPLOAD_FLAGS):
            widgets.append(WidgetSpec("upload", "upload", spec))
    return widgets


def default_widget_value(w: WidgetSpec):
    if w.kind == "control":
        c = w.input.options.get("control_after_generate")
        return c if isinstance(c, str) and c in CONTROL_VALUES else ("fixed" if w.input.type == "FLOAT" else "randomize")
    if w.kind == "upload":
        return "image"
    spec = w.input
    if "default" in spec.options:
        return spec.options["default"]
    if spec.type == "COMBO":
        return spec.combo_values[0] if spec.combo_values else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[spec.type]


def output_types(node_def: dict) -> list[str]:
    return [t if isinstance(t, str) else "COMBO" for t in node_def.get("output", [])]


def output_names(node_def: dict) -> list[str]:
    return list(node_def.get("output_name") or node_def.get("output", []))


# ---------------------------------------------------------------------------------------------
# reading files
# ---------------------------------------------------------------------------------------------
def is_api_format(data) -> bool:
    return (isinstance(data, dict) and "nodes" not in data and len(data) > 0
            and all(isinstance(v, dict) and "class_type" in v for v in data.values()))


def load(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not (is_api_format(data) or isinstance(data.get("nodes"), list)):
        raise WorkflowError(f"{path}: neither a UI-format workflow (with 'nodes' and 'links') nor an API-format prompt")
    return data


@dataclass
class Link:
    id: int
    origin_id: int
    origin_slot: int
    target_id: int
    target_slot: int
    type: str


def links_of(workflow: dict) -> dict[int, Link]:
    out = {}
    for raw in workflow.get("links") or []:
        if isinstance(raw, dict):
            link = Link(raw["id"], raw["origin_id"], raw["origin_slot"], raw["target_id"], raw["target_slot"], raw.get("type", "*"))
        else:
            link = Link(*raw[:6])
        out[link.id] = link
    return out


def _node_label(node: dict) -> str:
    title = node.get("title")
    return f"node {node.get('id')} ({node.get('type')}{', ' + repr(title) if title else ''})"


def widget_values_by_name(node: dict, node_def: dict) -> dict:
    """name → saved value of each serialized widget, assigned by position as the frontend does on
    load (missing values keep the widget's default; extra ones are ignored)."""
    saved = node.get("widgets_values")
    widgets = widget_specs(node_def)
    if isinstance(saved, dict):
        return {w.name: saved.get(w.name, default_widget_value(w)) for w in widgets if w.serialized}
    saved = list(saved or [])
    values = {}
    for i, w in enumerate(widgets):
        if w.serialized:
            values[w.name] = saved[i] if i < len(saved) else default_widget_value(w)
    return values


# ---------------------------------------------------------------------------------------------
# UI → API
# ---------------------------------------------------------------------------------------------
def to_api(workflow: dict, defs: dict) -> dict:
    """The API-format prompt the frontend would queue for this UI-format workflow (saved by an earlier version of
    this pack: first moved to its current nodes, as the frontend's ``web/d2f_migrate.js`` does on load)."""
    from .migrate import migrate_prompt, migrate_workflow  # it builds on this module's widget helpers

    if is_api_format(workflow):
        return copy.deepcopy(migrate_prompt(workflow, defs))
    workflow = migrate_workflow(workflow, defs)
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise WorkflowError("workflows with subgraphs are not supported by this converter")
    nodes = {n["id"]: n for n in workflow.get("nodes", [])}
    links = links_of(workflow)

    def resolve(link_id, depth=0):
        """(origin_id, slot) of a real node, ("value", v) from a primitive, or None."""
        if link_id is None or depth > 64:
            return None
        link = links.get(link_id)
        if link is None:
            return None
        origin = nodes.get(link.origin_id)
        if origin is None:
            return None
        if origin["type"] == "Reroute":
            ins = origin.get("inputs") or []
            return resolve(ins[0].get("link") if ins else None, depth + 1)
        if origin["type"] == "PrimitiveNode":
            vals = origin.get("widgets_values") or []
            return ("value", vals[0]) if vals else None
        if origin.get("mode", MODE_ALWAYS) == MODE_BYPASS:
            ins = origin.get("inputs") or []
            outs = origin.get("outputs") or []
            out_type = outs[link.origin_slot]["type"] if link.origin_slot < len(outs) else link.type
            candidates = []
            if link.origin_slot < len(ins):
                candidates.append(ins[link.origin_slot])
            candidates += ins
            for inp in candidates:
                if inp.get("link") is not None and inp.get("type") in (out_type, "*"):
                    return resolve(inp["link"], depth + 1)
            return None
        return (str(origin["id"]), int(link.origin_slot))

    prompt = {}
    for node in sorted(nodes.values(), key=lambda n: n["id"]):
        typ = node["type"]
        if typ in VIRTUAL_NODE_TYPES or node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
            continue
        node_def = defs.get(typ)
        if node_def is None:
            raise WorkflowError(f"{_node_label(node)}: node type '{typ}' is not installed in this ComfyUI")
        inputs = {}
        for name, value in widget_values_by_name(node, node_def).items():
            inputs[name] = {"__value__": value} if isinstance(value, list) else value
        for inp in node.get("inputs") or []:
            resolved = resolve(inp.get("link"))
            if resolved is None:
                continue
            if resolved[0] == "value":
                value = resolved[1]
                inputs[inp["name"]] = {"__value__": value} if isinstance(value, list) else value
            else:
                inputs[inp["name"]] = [resolved[0], resolved[1]]
        title = node.get("title") or node_def.get("display_name") or typ
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": typ, "_meta": {"title": title}}
    for entry in prompt.values():
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and value[0] not in prompt:
                del entry["inputs"][name]
    return prompt


# ---------------------------------------------------------------------------------------------
# checking a UI workflow against the host's node definitions
# ---------------------------------------------------------------------------------------------
def _type_matches(a: str, b: str) -> bool:
    """Link type compatibility as LiteGraph checks it (``*`` and comma-separated unions)."""
    if a in ("*", "") or b in ("*", ""):
        return True
    sa = {t.strip() for t in str(a).split(",")}
    sb = {t.strip() for t in str(b).split(",")}
    return bool(sa & sb)


def check_widget_value(spec: InputSpec, value, check_combo: bool = True) -> str | None:
    """Why ``value`` is not acceptable for this widget input, or None."""
    t = spec.type
    o = spec.options
    if t == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"expects an integer, got {value!r}"
    elif t == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"expects a number, got {value!r}"
    elif t == "BOOLEAN":
        if not isinstance(value, bool):
            return f"expects true/false, got {value!r}"
    elif t == "STRING":
        if not isinstance(value, str):
            return f"expects a string, got {value!r}"
    elif t == "COMBO":
        if not isinstance(value, str) and not isinstance(value, (int, float)):
            return f"expects one of the combo's options, got {value!r}"
        if check_combo and spec.combo_values is not None and value not in spec.combo_values:
            shown = ", ".join(map(repr, spec.combo_values[:8])) + (" …" if len(spec.combo_values) > 8 else "")
            return f"{value!r} is not one of the options ({shown or 'none available'})"
    if t in ("INT", "FLOAT"):
        if o.get("min") is not None and value < o["min"]:
            return f"{value!r} is below the minimum {o['min']}"
        if o.get("max") is not None and value > o["max"]:
            return f"{value!r} is above the maximum {o['max']}"
    return None


def validate(workflow: dict, defs: dict, check_combos: bool = True) -> list[str]:
    """Problems of a UI-format workflow against the node definitions: unknown node types, widget
    value counts and types (combos against their current options when ``check_combos``), link
    types and the consistency of ``links`` with the nodes' ``inputs``/``outputs``, required inputs
    left unconnected. An empty list means the frontend would load it as saved and queue it."""
    problems = []
    if workflow.get("version") != 0.4:
        problems.append(f"workflow version is {workflow.get('version')!r}, the frontend saves 0.4")
    nodes = {}
    for node in workflow.get("nodes", []):
        if node.get("id") in nodes:
            problems.append(f"duplicate node id {node.get('id')}")
        nodes[node.get("id")] = node
    links = links_of(workflow)
    if workflow.get("last_node_id") is not None and nodes and max(nodes) > workflow["last_node_id"]:
        problems.append(f"last_node_id {workflow['last_node_id']} is below the largest node id {max(nodes)}")
    if workflow.get("last_link_id") is not None and links and max(links) > workflow["last_link_id"]:
        problems.append(f"last_link_id {workflow['last_link_id']} is below the largest link id {max(links)}")

    for node in nodes.values():
        label = _node_label(node)
        typ = node.get("type")
        for key in ("pos", "size"):
            v = node.get(key)
            if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v)):
                problems.append(f"{label}: '{key}' must be [x, y], got {v!r}")
        if typ in ("Note", "MarkdownNote"):
            vals = node.get("widgets_values") or []
            if len(vals) != 1 or not isinstance(vals[0], str):
                problems.append(f"{label}: a note keeps its text as widgets_values [text]")
            continue
        if typ in VIRTUAL_NODE_TYPES:
            continue
        node_def = defs.get(typ)
        if node_def is None:
            problems.append(f"{label}: node type '{typ}' does not exist in this host")
            continue
        widgets = widget_specs(node_def)
        saved = node.get("widgets_values")
        if isinstance(saved, dict):
            problems.append(f"{label}: widgets_values is a dict; the frontend saves a list for this node")
            saved = []
        saved = list(saved or [])
        if len(saved) != len(widgets):
            problems.append(f"{label}: {len(saved)} widget values saved, the node has {len(widgets)} widgets "
                            f"({', '.join(w.name for w in widgets)})")
        for w, value in zip(widgets, saved):
            if w.kind == "control":
                if value not in CONTROL_VALUES:
                    problems.append(f"{label}: {w.input.name}'s control_after_generate must be one of {CONTROL_VALUES}, got {value!r}")
            elif w.kind == "upload":
                if not isinstance(value, str):
                    problems.append(f"{label}: upload widget value must be a string, got {value!r}")
            else:
                why = check_widget_value(w.input, value, check_combos)
                if why:
                    problems.append(f"{label}: widget '{w.name}' {why}")

        specs = {s.name: s for s in input_specs(node_def)}
        seen_inputs = set()
        for slot, inp in enumerate(node.get("inputs") or []):
            name = inp.get("name")
            seen_inputs.add(name)
            spec = specs.get(name)
            if spec is None:
                problems.append(f"{label}: input '{name}' does not exist on {typ}")
                continue
            if spec.is_widget and "widget" not in inp:
                problems.append(f"{label}: input '{name}' is a widget; its socket needs \"widget\": {{\"name\": \"{name}\"}}")
            if inp.get("type") not in (None, "*") and not _type_matches(inp["type"], spec.type):
                problems.append(f"{label}: input '{name}' has type {inp.get('type')}, the node defines {spec.type}")
            link_id = inp.get("link")
            if link_id is None:
                continue
            link = links.get(link_id)
            if link is None:
                problems.append(f"{label}: input '{name}' refers to missing link {link_id}")
                continue
            if link.target_id != node["id"] or link.target_slot != slot:
                problems.append(f"{label}: link {link_id} targets node {link.target_id} slot {link.target_slot}, "
                                f"but is stored on input '{name}' (slot {slot})")
            if not _type_matches(link.type, spec.type):
                problems.append(f"{label}: link {link_id} of type {link.type} goes into '{name}' of type {spec.type}")
        for spec in specs.values():
            if spec.required and not spec.is_widget and spec.name not in seen_inputs:
                problems.append(f"{label}: required input '{spec.name}' has no socket")
            if spec.required and not spec.is_widget and node.get("mode", 0) == MODE_ALWAYS:
                inp = next((i for i in node.get("inputs") or [] if i.get("name") == spec.name), None)
                if inp is not None and inp.get("link") is None:
                    problems.append(f"{label}: required input '{spec.name}' is not connected")

        types = output_types(node_def)
        outs = node.get("outputs") or []
        if len(outs) != len(types):
            problems.append(f"{label}: {len(outs)} outputs saved, {typ} has {len(types)}")
        for slot, out in enumerate(outs):
            if slot < len(types) and not _type_matches(out.get("type"), types[slot]):
                problems.append(f"{label}: output {slot} has type {out.get('type')}, {typ} defines {types[slot]}")
            for link_id in out.get("links") or []:
                link = links.get(link_id)
                if link is None:
                    problems.append(f"{label}: output {slot} lists missing link {link_id}")
                elif link.origin_id != node["id"] or link.origin_slot != slot:
                    problems.append(f"{label}: output {slot} lists link {link_id}, which starts at node "
                                    f"{link.origin_id} slot {link.origin_slot}")

    for link in links.values():
        origin, target = nodes.get(link.origin_id), nodes.get(link.target_id)
        if origin is None or target is None:
            problems.append(f"link {link.id} connects missing node {link.origin_id if origin is None else link.target_id}")
            continue
        outs = origin.get("outputs") or []
        ins = target.get("inputs") or []
        if link.origin_slot >= len(outs) or link.id not in (outs[link.origin_slot].get("links") or []):
            problems.append(f"link {link.id} is not listed on {_node_label(origin)} output {link.origin_slot}")
        elif not _type_matches(outs[link.origin_slot].get("type"), link.type):
            problems.append(f"link {link.id} has type {link.type}, but {_node_label(origin)} output "
                            f"{link.origin_slot} is {outs[link.origin_slot].get('type')}")
        if link.target_slot >= len(ins) or ins[link.target_slot].get("link") != link.id:
            problems.append(f"link {link.id} is not the link of {_node_label(target)} input {link.target_slot}")
    return problems


# ---------------------------------------------------------------------------------------------
# overrides (d2f run --set, tests' tiny settings)
# ---------------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[str, str, object]:
    """``SELECTOR.input=value``: SELECTOR is a node id, class type or title; value is JSON when it
    parses as JSON, else the plain string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise WorkflowError(f"--set wants NODE.input=value (NODE: id, type or title), got '{text}'")
    lhs, raw = text.split("=", 1)
    selector, name = lhs.rsplit(".", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return selector.strip(), name.strip(), value


def apply_overrides(prompt: dict, overrides, defs: dict | None = None) -> dict:
    """Set widget inputs of an API prompt in place: ``overrides`` holds (selector, input, value)
    triples or ``SELECTOR.input=value`` strings. Every override must hit at least one node input
    that holds a value (not a link). With the node definitions, a D2FTrain setting that moved to an
    option node (``D2FTrain.training_dtype``) is set on that option node, added where there is none."""
    for item in overrides:
        selector, name, value = parse_override(item) if isinstance(item, str) else item
        hits = 0
        for node_id, entry in prompt.items():
            if selector not in (node_id, entry.get("class_type"), (entry.get("_meta") or {}).get("title")):
                continue
            current = entry["inputs"].get(name)
            if name not in entry["inputs"] or (isinstance(current, list) and len(current) == 2):
                continue
            entry["inputs"][name] = value
            hits += 1
        if not hits and defs is not None:
            from .migrate import route_override
            hits = route_override(prompt, selector, name, value, defs)
        if not hits:
            raise WorkflowError(f"override {selector}.{name}: no node matched by id, type or title has a widget '{name}'")
    return prompt


# ---------------------------------------------------------------------------------------------
# layout: where the frontend draws a node and a group
# ---------------------------------------------------------------------------------------------
# LiteGraph draws a node's title bar above its ``pos`` and grows the node to fit its slot and widget rows
# whatever ``size`` says: in frontend 1.49, D2FTrain (30 widget rows, 5 slot rows) measured 1008 px below
# its title, about 29 px a row. So rows count 30 px here, more than any measured node needs.
NODE_TITLE_HEIGHT = 30
ROW_HEIGHT = 30
GROUP_TITLE_HEIGHT = 40  # font_size 24 plus padding
GROUP_PADDING = 10


def node_rows(node: dict) -> int:
    """Rows the frontend lays out below the title: one per widget (control_after_generate ones
    included) plus the taller of the input and output socket columns (linked widgets have no row of their own)."""
    widgets = node.get("widgets_values")
    sockets = [i for i in node.get("inputs") or [] if not i.get("widget")]
    return (len(widgets) if isinstance(widgets, list) else 0) + max(len(sockets), len(node.get("outputs") or []))


def node_rect(node: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the node as drawn: title bar included, height at least ``node_rows``."""
    x, y = node["pos"][:2]
    width, height = node["size"][:2]
    height = max(height, node_rows(node) * ROW_HEIGHT)
    return x, y - NODE_TITLE_HEIGHT, x + width, y + height


def group_body(group: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the part of a group below its title bar, where its nodes go."""
    x, y, w, h = group["bounding"]
    return x, y + GROUP_TITLE_HEIGHT, x + w, y + h


def rect_inside(inner, outer) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def rects_overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


# ---------------------------------------------------------------------------------------------
# writing workflows (used to author the pack's examples)
# ---------------------------------------------------------------------------------------------
@dataclass
class WorkflowBuilder:
    """Builds a UI-format workflow node by node, with widget values ordered as the frontend orders
    them and ``links`` kept consistent with the nodes' inputs/outputs."""

    defs: dict
    nodes: list = field(default_factory=list)
    links: list = field(default_factory=list)
    groups: list = field(default_factory=list)

    def node(self, typ: str, pos=(0, 0), size=None, title=None, color=None, bgcolor=None, **widgets) -> dict:
        node_def = self.defs.get(typ)
        if node_def is None:
            raise WorkflowError(f"node type '{typ}' is not in the host's node definitions")
        specs = widget_specs(node_def)
        unknown = set(widgets) - {w.name for w in specs if w.kind == "value"} - {f"{w.input.name}__control" for w in specs}
        if unknown:
            raise WorkflowError(f"{typ} has no widgets {sorted(unknown)}")
        values = []
        for w in specs:
            if w.kind == "control":
                values.append(widgets.get(f"{w.input.name}__control", "fixed"))
            else:
                values.append(widgets[w.name] if w.kind == "value" and w.name in widgets else default_widget_value(w))
        inputs = [{"name": s.name, "type": s.type, "link": None} for s in input_specs(node_def) if not s.is_widget]
        for i in inputs:
            if not next(s for s in input_specs(node_def) if s.name == i["name"]).required:
                i["shape"] = 7  # the frontend draws optional sockets hollow
        outputs = [{"name": n, "type": t, "links": []} for n, t in zip(output_names(node_def), output_types(node_def))]
        node = {"id": len(self.nodes) + 1, "type": typ, "pos": list(pos), "size": list(size or [315, 100]),
                "flags": {}, "order": len(self.nodes), "mode": MODE_ALWAYS, "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": typ}, "widgets_values": values}
        if title:
            node["title"] = title
        if color:
            node["color"] = color
        if bgcolor:
            node["bgcolor"] = bgcolor
        self.nodes.append(node)
        return node

    def note(self, text: str, pos=(0, 0), size=(400, 200), title=None) -> dict:
        node = {"id": len(self.nodes) + 1, "type": "Note", "pos": list(pos), "size": list(size), "flags": {},
                "order": len(self.nodes), "mode": MODE_ALWAYS, "inputs": [], "outputs": [],
                "properties": {"text": ""}, "widgets_values": [text], "color": "#432", "bgcolor": "#653"}
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def link(self, src: dict, output, dst: dict, input_name: str) -> int:
        outs = src["outputs"]
        slot = output if isinstance(output, int) else next(
            (i for i, o in enumerate(outs) if o["name"] == output), None)
        if slot is None:
            slot = next((i for i, o in enumerate(outs) if o["type"] == output), None)
        if slot is None:
            raise WorkflowError(f"{src['type']} has no output {output!r}")
        target = next((i for i, inp in enumerate(dst["inputs"]) if inp["name"] == input_name), None)
        if target is None:  # a widget input: the frontend adds its socket when it gets linked
            spec = next((s for s in input_specs(self.defs[dst["type"]]) if s.name == input_name), None)
            if spec is None:
                raise WorkflowError(f"{dst['type']} has no input '{input_name}'")
            dst["inputs"].append({"name": input_name, "type": spec.type, "widget": {"name": input_name}, "link": None})
            target = len(dst["inputs"]) - 1
        link_id = len(self.links) + 1
        typ = outs[slot]["type"]
        self.links.append([link_id, src["id"], slot, dst["id"], target, typ])
        outs[slot]["links"].append(link_id)
        dst["inputs"][target]["link"] = link_id
        return link_id

    def columns(self, columns, x: float = 0, y: float = 40, gap_x: float = 60, gap_y: float = 30) -> float:
        """Place ``columns`` (lists of nodes) left to right from (x, y), each node below the previous one
        by its drawn height (``node_rect``), so no two nodes overlap however tall the frontend makes them.
        Returns the x where a next column would go."""
        for column in columns:
            top = y
            for node in column:
                node["pos"] = [x, top]
                top = node_rect(node)[3] + gap_y + NODE_TITLE_HEIGHT
            x += max((n["size"][0] for n in column), default=0) + gap_x
        return x

    def group(self, title: str, members, color="#3f789e"):
        """A group around ``members`` (nodes already placed), padded, with room for its title bar."""
        rects = [node_rect(n) for n in members]
        left = min(r[0] for r in rects) - GROUP_PADDING
        top = min(r[1] for r in rects) - GROUP_PADDING - GROUP_TITLE_HEIGHT
        right = max(r[2] for r in rects) + GROUP_PADDING
        bottom = max(r[3] for r in rects) + GROUP_PADDING
        self.groups.append({"id": len(self.groups) + 1, "title": title, "color": color, "font_size": 24, "flags": {},
                            "bounding": [left, top, right - left, bottom - top]})

    def to_json(self, extra: dict | None = None) -> dict:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": self.groups, "config": {},
                "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}, **(extra or {})}, "version": 0.4}


def dump(workflow: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(workflow, f, indent=2, ensure_ascii=False)
        f.write("\n")

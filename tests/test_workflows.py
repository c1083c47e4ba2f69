"""The shipped workflows: UI and API format describe the same graph, valid for this pack's nodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nodes import NODE_CLASS_MAPPINGS

REPO = Path(__file__).parents[1]
UI = REPO / "workflows" / "lookback_i2v.json"
API = REPO / "workflows" / "api" / "lookback_i2v_api.json"
TOY_UI = REPO / "workflows" / "lookback_toy_i2v.json"
TOY_API = REPO / "workflows" / "api" / "lookback_toy_i2v_api.json"
BYPASSED = 4  # a UI node's mode when it is bypassed (Ctrl+B)
SHIPPED_TOY_FILES = {"sd15_toy.safetensors", "lookback_toy.safetensors"}  # listed by the pack itself
PAIRS = pytest.mark.parametrize("ui_path, api_path", [(UI, API), (TOY_UI, TOY_API)], ids=["sd15", "toy"])
CORE_NODES = {
    "CheckpointLoaderSimple",
    "LoraLoader",
    "CLIPTextEncode",
    "LoadImage",
    "ImageScale",
    "KSampler",
    "VAEDecode",
}
# the folders of a custom node pack that ComfyUI serves as templates (app/custom_node_manager.py)
TEMPLATE_FOLDERS = ("example_workflows", "example", "examples", "workflow", "workflows")


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_templates_are_ui_workflows_with_thumbnails_listed_once() -> None:
    served = [p for folder in TEMPLATE_FOLDERS for p in (REPO / folder).glob("*.json")]
    assert sorted(p.name for p in served) == [
        "lookback_i2v.json",
        "lookback_toy_i2v.json",
    ]  # API twins: workflows/api/
    for path in served:
        assert {"nodes", "links"} <= set(_load(path)), f"{path} is not in UI format"
        assert path.with_suffix(".jpg").is_file(), f"{path} has no thumbnail"


@PAIRS
def test_only_core_nodes_and_this_pack(ui_path, api_path) -> None:
    types = {node["class_type"] for node in _load(api_path).values()}
    assert types <= CORE_NODES | set(NODE_CLASS_MAPPINGS)
    assert {"LookBackWeightsLoader", "LookBackApply", "LookBackImageToVideo", "LookBackVideoCombine"} <= types


def test_the_checkpoint_is_loaded_once_and_the_lora_node_ships_bypassed() -> None:
    """A first Run needs no LoRA file: the LoRA node is in place, bypassed (mode 4), so the API
    form (what ComfyUI runs) passes the checkpoint's MODEL and CLIP straight through."""
    api = _load(API)
    assert sum("ckpt_name" in node["inputs"] for node in api.values()) == 1
    lora = next(n for n in _load(UI)["nodes"] if n["type"] == "LoraLoader")
    assert lora["mode"] == BYPASSED and "LoraLoader" not in {n["class_type"] for n in api.values()}
    by_type = {node["class_type"]: node for node in api.values()}
    checkpoint = next(k for k, v in api.items() if v["class_type"] == "CheckpointLoaderSimple")
    assert by_type["LookBackApply"]["inputs"]["model"] == [checkpoint, 0]
    assert by_type["KSampler"]["inputs"]["model"][0] == next(
        k for k, v in api.items() if v["class_type"] == "LookBackApply"
    )


@PAIRS
def test_missing_model_files_are_filed_under_their_folders(ui_path, api_path) -> None:
    """The frontend's missing-models list reads a loader's folder from ``properties.models``."""
    folders = {"CheckpointLoaderSimple": "checkpoints", "LookBackWeightsLoader": "lookback"}
    for node in _load(ui_path)["nodes"]:
        if node["type"] in folders and node["widgets_values"][0] not in SHIPPED_TOY_FILES:
            assert node["properties"]["models"] == [
                {"name": node["widgets_values"][0], "directory": folders[node["type"]]}
            ], node["type"]


def _through_bypassed(ui: dict, src: int, slot: int, link_type: str) -> tuple[int, int]:
    """Where a link really starts: a bypassed node passes on its input of the same type."""
    nodes = {n["id"]: n for n in ui["nodes"]}
    links = {link[0]: link for link in ui["links"]}
    while nodes[src]["mode"] == BYPASSED:
        given = next(i for i in nodes[src]["inputs"] if i["type"] == link_type)
        _, src, slot, *_ = links[given["link"]]
    return src, slot


@PAIRS
def test_ui_and_api_formats_hold_the_same_graph(ui_path, api_path) -> None:
    """The API form is what the frontend makes of the UI form: bypassed nodes left out, their
    links passed through."""
    ui, api = _load(ui_path), _load(api_path)
    active = {str(n["id"]): n["type"] for n in ui["nodes"] if n["mode"] != BYPASSED}
    assert active == {k: v["class_type"] for k, v in api.items()}
    ui_edges = set()
    for link_id, src, src_slot, dst, dst_slot, link_type in ui["links"]:
        dst_node = next(n for n in ui["nodes"] if n["id"] == dst)
        assert dst_node["inputs"][dst_slot]["link"] == link_id
        if dst_node["mode"] == BYPASSED:
            continue
        src, src_slot = _through_bypassed(ui, src, src_slot, link_type)
        ui_edges.add((str(src), src_slot, str(dst), dst_node["inputs"][dst_slot]["name"]))
    api_edges = {
        (value[0], value[1], node_id, name)
        for node_id, node in api.items()
        for name, value in node["inputs"].items()
        if isinstance(value, list)
    }
    assert ui_edges == api_edges


@PAIRS
def test_pack_nodes_get_every_required_input_with_valid_values(ui_path, api_path) -> None:
    ui = {str(n["id"]): n for n in _load(ui_path)["nodes"]}
    for node_id, node in _load(api_path).items():
        cls = NODE_CLASS_MAPPINGS.get(node["class_type"])
        if cls is None:
            continue
        spec = cls.INPUT_TYPES()
        required, optional = spec["required"], spec.get("optional", {})
        assert set(required) <= set(node["inputs"]), node_id
        assert set(node["inputs"]) <= set(required) | set(optional), node_id
        inputs = {**required, **optional}  # the frontend's widget order: required, then optional
        widgets = [
            name
            for name, (kind, *_) in inputs.items()
            if kind in ("INT", "FLOAT", "STRING", "BOOLEAN") or isinstance(kind, list)
        ]
        values = [v for v in ui[node_id]["widgets_values"] if v not in ("fixed", "randomize")]
        assert values == [node["inputs"][name] for name in widgets], node_id
        for name in widgets:
            kind, options = inputs[name][0], inputs[name][1] if len(inputs[name]) > 1 else {}
            value = node["inputs"][name]
            if kind in ("INT", "FLOAT"):
                assert options.get("min", value) <= value <= options.get("max", value), (node_id, name)
            elif isinstance(kind, list) and kind:
                assert value in kind, (node_id, name)
            elif isinstance(kind, list):  # a file list, empty outside ComfyUI: the toy's shipped files
                assert ui_path != TOY_UI or value in SHIPPED_TOY_FILES


@PAIRS
def test_link_types_match_the_pack_nodes_outputs(ui_path, api_path) -> None:
    ui = _load(ui_path)
    for _id, src, src_slot, dst, dst_slot, link_type in ui["links"]:
        src_node = next(n for n in ui["nodes"] if n["id"] == src)
        dst_node = next(n for n in ui["nodes"] if n["id"] == dst)
        assert src_node["outputs"][src_slot]["type"] == link_type == dst_node["inputs"][dst_slot]["type"]
        cls = NODE_CLASS_MAPPINGS.get(src_node["type"])
        if cls is not None:
            assert cls.RETURN_TYPES[src_slot] == link_type


@PAIRS
def test_the_pack_nodes_outputs_are_their_outputs_in_order(ui_path, api_path) -> None:
    """Every output slot of a pack node in a template is the node's own, in order (an output added
    to a node is appended, so the links of saved workflows keep their slots)."""
    for node in _load(ui_path)["nodes"]:
        cls = NODE_CLASS_MAPPINGS.get(node["type"])
        if cls is not None:
            slots = [(output["name"], output["type"]) for output in node["outputs"]]
            assert slots == list(zip(cls.RETURN_NAMES, cls.RETURN_TYPES)), node["type"]


# How the frontend (ComfyUI_frontend 1.49.6, LiteGraph) draws a node, as far as the file shows it:
# a title bar of NODE_TITLE_HEIGHT above ``pos``, and a body of ``size`` that it grows on load to
# what the title, slots and widgets need. Measured in Chromium (14px Inter): titles need their
# text (7.2 px a character at most in these templates) + 40 px; the body 20 px a slot row, 24 px a
# widget + 14 px (6 px without widgets), a multiline text box 30 px more; 210 px wide at least with
# widgets (223 px for Load Image), 140 px without. The estimates below are at least that (8 px a
# character, 240/160 px at least), so a box here is never smaller than the one drawn.
TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT
GAP = 20  # the least free space between two drawn nodes, in graph units (default zoom about 1)
MULTILINE = {"CLIPTextEncode"}  # nodes with a multiline text box


def _least_size(node: dict) -> tuple[int, int]:
    widgets = len(node.get("widgets_values") or [])
    width = max(8 * len(node.get("title") or node["type"]) + 40, 240 if widgets else 160)
    rows = max(len(node.get("inputs", [])), len(node.get("outputs", [])), 1)
    height = rows * 20 + (widgets * 24 + 14 if widgets else 6) + (30 if node["type"] in MULTILINE else 0)
    return width, height


def _drawn_box(node: dict) -> tuple[float, float, float, float]:
    """left, top, right, bottom of the node as drawn, its title bar included."""
    (x, y), (w, h) = node["pos"], node["size"]
    least_w, least_h = _least_size(node)
    return x, y - TITLE_HEIGHT, x + max(w, least_w), y + max(h, least_h)


@PAIRS
def test_every_node_is_saved_at_least_as_large_as_it_is_drawn(ui_path, api_path) -> None:
    """A node saved smaller than its title, slots and widgets need is drawn larger than the
    layout allows for (the toy KSampler's long title made it wider than its place)."""
    small = [
        (node["title"], node["size"], _least_size(node))
        for node in _load(ui_path)["nodes"]
        if node["size"][0] < _least_size(node)[0] or node["size"][1] < _least_size(node)[1]
    ]
    assert not small


@PAIRS
def test_no_node_covers_another(ui_path, api_path) -> None:
    """Every widget of every node can be seen and clicked as the template opens: no two drawn
    boxes (title bars included) overlap, and at least GAP lies between them."""
    boxes = [(node["title"], _drawn_box(node)) for node in _load(ui_path)["nodes"]]
    too_close = [
        (title_a, title_b)
        for i, (title_a, (left_a, top_a, right_a, bottom_a)) in enumerate(boxes)
        for title_b, (left_b, top_b, right_b, bottom_b) in boxes[i + 1 :]
        if max(left_b - right_a, left_a - right_b, top_b - bottom_a, top_a - bottom_b) < GAP
    ]
    assert not too_close

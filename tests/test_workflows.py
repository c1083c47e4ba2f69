"""The shipped workflows: UI and API format describe the same graph, valid for this pack's nodes."""

from __future__ import annotations

import json
from pathlib import Path

from nodes import NODE_CLASS_MAPPINGS

REPO = Path(__file__).parents[1]
UI = REPO / "workflows" / "lookback_i2v.json"
API = REPO / "workflows" / "api" / "lookback_i2v_api.json"
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
    assert [p.name for p in served] == ["lookback_i2v.json"]  # the API twin lives in workflows/api/
    for path in served:
        assert {"nodes", "links"} <= set(_load(path)), f"{path} is not in UI format"
        assert path.with_suffix(".jpg").is_file(), f"{path} has no thumbnail"


def test_only_core_nodes_and_this_pack() -> None:
    types = {node["class_type"] for node in _load(API).values()}
    assert types <= CORE_NODES | set(NODE_CLASS_MAPPINGS)
    assert {"LookBackWeightsLoader", "LookBackApply", "LookBackImageToVideo", "LookBackVideoCombine"} <= types


def test_the_checkpoint_is_loaded_once_and_the_lora_reaches_the_lookback_model() -> None:
    api = _load(API)
    assert sum("ckpt_name" in node["inputs"] for node in api.values()) == 1
    by_type = {node["class_type"]: node for node in api.values()}
    lora = by_type["LoraLoader"]
    assert lora["inputs"]["strength_model"] == 0 == lora["inputs"]["strength_clip"]
    assert by_type["LookBackApply"]["inputs"]["model"][0] == next(k for k, v in api.items() if v is lora)
    assert by_type["KSampler"]["inputs"]["model"][0] == next(
        k for k, v in api.items() if v["class_type"] == "LookBackApply"
    )


def test_ui_and_api_formats_hold_the_same_graph() -> None:
    ui, api = _load(UI), _load(API)
    assert {str(n["id"]): n["type"] for n in ui["nodes"]} == {k: v["class_type"] for k, v in api.items()}
    ui_edges = set()
    for link_id, src, src_slot, dst, dst_slot, _type in ui["links"]:
        dst_node = next(n for n in ui["nodes"] if n["id"] == dst)
        assert dst_node["inputs"][dst_slot]["link"] == link_id
        ui_edges.add((str(src), src_slot, str(dst), dst_node["inputs"][dst_slot]["name"]))
    api_edges = {
        (value[0], value[1], node_id, name)
        for node_id, node in api.items()
        for name, value in node["inputs"].items()
        if isinstance(value, list)
    }
    assert ui_edges == api_edges


def test_pack_nodes_get_every_required_input_with_valid_values() -> None:
    ui = {str(n["id"]): n for n in _load(UI)["nodes"]}
    for node_id, node in _load(API).items():
        cls = NODE_CLASS_MAPPINGS.get(node["class_type"])
        if cls is None:
            continue
        spec = cls.INPUT_TYPES()
        required, optional = spec["required"], spec.get("optional", {})
        assert set(required) <= set(node["inputs"]), node_id
        assert set(node["inputs"]) <= set(required) | set(optional), node_id
        widgets = [
            name
            for name, (kind, *_) in required.items()
            if kind in ("INT", "FLOAT", "STRING", "BOOLEAN") or isinstance(kind, list)
        ]
        values = [v for v in ui[node_id]["widgets_values"] if v not in ("fixed", "randomize")]
        assert values == [node["inputs"][name] for name in widgets], node_id
        for name in widgets:
            kind, options = required[name][0], required[name][1] if len(required[name]) > 1 else {}
            value = node["inputs"][name]
            if kind in ("INT", "FLOAT"):
                assert options.get("min", value) <= value <= options.get("max", value), (node_id, name)
            elif isinstance(kind, list) and kind:
                assert value in kind, (node_id, name)


def test_link_types_match_the_pack_nodes_outputs() -> None:
    ui = _load(UI)
    for _id, src, src_slot, dst, dst_slot, link_type in ui["links"]:
        src_node = next(n for n in ui["nodes"] if n["id"] == src)
        dst_node = next(n for n in ui["nodes"] if n["id"] == dst)
        assert src_node["outputs"][src_slot]["type"] == link_type == dst_node["inputs"][dst_slot]["type"]
        cls = NODE_CLASS_MAPPINGS.get(src_node["type"])
        if cls is not None:
            assert cls.RETURN_TYPES[src_slot] == link_type

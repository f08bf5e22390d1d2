"""``rope-ext info MODEL``: a model's RoPE facts (family, head and rotary dims, base, trained length),
its current rope settings, attention implementation, and which rope_ext methods apply to it.

MODEL is a local checkpoint directory, a .gguf file, or an alias (``smollm2``). Only the config is
read: the module tree is built on the meta device (no weights are loaded or allocated) so that the
rotary dimension comes from the model's own rotary module, as ``rope_ext.patch`` sees it.
"""
from __future__ import annotations

import argparse
import copy
import json
from typing import Any


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("info", help="show a model's RoPE settings and which methods apply", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL", help="local checkpoint directory, .gguf file, or alias (smollm2)")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    parser.set_defaults(func=run)


def applicability(cls: type, family: Any) -> tuple[bool, str]:
    """(applies, note) for a method class on a family, by the rule ``rope_ext.patch`` enforces:
    static frequency methods only write the rotary module; everything else needs the family's
    attention to go through transformers' AttentionInterface."""
    if not cls.for_pretrained_rope:
        label = cls.summary.split(":")[0] or cls.name
        return family.attention_interface, f"for {label}-trained models" + ("" if family.attention_interface else
                                                                              "; needs AttentionInterface")
    if cls.kind == "frequency" and cls.rotation == "static":
        return True, "logn=True needs AttentionInterface" if not family.attention_interface else ""
    if not family.attention_interface:
        return False, f"{family.name} attention does not go through AttentionInterface"
    return True, ""


def method_table(family: Any) -> list[dict[str, Any]]:
    from rope_ext.methods import REGISTRY

    rows = []
    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        applies, note = applicability(cls, family)
        rows.append({"name": name, "kind": cls.kind, "rotation": cls.rotation, "applies": applies, "note": note})
    return rows


def gather(model: str) -> dict[str, Any]:
    """Everything ``info`` prints, as plain data (the ``--json`` object)."""
    from rope_ext.facts import config_facts, main_spec
    from rope_ext.models import load_config

    config = load_config(model)
    facts = config_facts(config)
    family, specs = facts["family"], facts["specs"]
    main = main_spec(specs)
    configured = getattr(config, "_attn_implementation", None)
    tables = {str(lt): {"rope_theta": s.rope_theta, "rotary_dim": s.rotary_dim, "trained_length": s.trained_length}
              for lt, s in specs.items()} if len(specs) > 1 else None
    return {
        "model": str(model),
        "model_type": config.model_type,
        "family": family.name,
        "family_notes": family.notes,
        "num_heads": main.num_heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or main.num_heads,
        "head_dim": main.head_dim,
        "rotary_dim": main.rotary_dim,
        "rope_theta": main.rope_theta,
        "trained_length": main.trained_length,
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
        "rope_tables": tables,
        "rope_parameters": copy.deepcopy(config.rope_parameters),
        "rope_ext": copy.deepcopy(getattr(config, "rope_ext", None)),
        "attn_implementation": configured or facts["attn_implementation"],
        "attn_implementation_source": "config" if configured else "transformers default for this architecture",
        "attention_interface": family.attention_interface,
        "methods": method_table(family),
    }


def patch_line(block: dict[str, Any] | None) -> str:
    """``ntk(factor=4.0, ...)`` for a saved rope_ext block (re-applied by rope_ext.load), or "none"."""
    if not block:
        return "none (unpatched)"
    params = ", ".join(f"{k}={v!r}" for k, v in sorted(block.get("params", {}).items()))
    original = json.dumps(block.get("original_rope_parameters"), sort_keys=True)
    return f"{block.get('method')}({params}), re-applied by rope_ext.load; original rope_parameters {original}"


def render(info: dict[str, Any]) -> str:
    rows = [
        ("model", info["model"]),
        ("family", f"{info['family']} (model_type {info['model_type']})" + (f"; {info['family_notes']}" if info["family_notes"] else "")),
        ("heads", f"{info['num_heads']} query, {info['num_kv_heads']} key/value"),
        ("head_dim", str(info["head_dim"])),
        ("rotary_dim", f"{info['rotary_dim']}" + ("" if info["rotary_dim"] == info["head_dim"] else " (partial rotary)")),
        ("rope_theta", f"{info['rope_theta']:g}" + (" (before the rope_ext patch)" if info["rope_ext"] else "")),
        ("trained length", str(info["trained_length"])),
        ("max_position_embeddings", str(info["max_position_embeddings"])),
        ("rope_parameters", json.dumps(info["rope_parameters"], sort_keys=True)),
        ("rope_ext patch", patch_line(info["rope_ext"])),
        ("attention", f"{info['attn_implementation']} ({info['attn_implementation_source']}); "
                      f"AttentionInterface: {'yes' if info['attention_interface'] else 'no'}"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    if info["rope_tables"]:
        lines.append("rope tables per layer type:")
        lines.extend(f"  {lt}: rope_theta {t['rope_theta']:g}, rotary_dim {t['rotary_dim']}, trained length {t['trained_length']}"
                     for lt, t in info["rope_tables"].items())
    lines.append("")
    lines.append("methods:")
    name_w = max(len(m["name"]) for m in info["methods"])
    kind_w = max(len(f"{m['kind']}/{m['rotation']}") for m in info["methods"])
    for m in info["methods"]:
        mark = "yes" if m["applies"] else "no "
        lines.append(f"  {mark}  {m['name'].ljust(name_w)}  {(m['kind'] + '/' + m['rotation']).ljust(kind_w)}  {m['note']}".rstrip())
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    info = gather(args.model)
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0

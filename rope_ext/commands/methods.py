"""``rope-ext methods``: the registered length-extrapolation methods, their parameters and papers."""
from __future__ import annotations

import argparse
import json
import shutil
import textwrap
from typing import Any

# Parameters every method inherits from rope_ext.methods.base.Method; listed once under the table.
COMMON = ("logn", "original_max_position_embeddings", "sinks", "cache_window")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("methods", help="list the registered methods and their parameters", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    parser.set_defaults(func=run)


def describe(cls: type) -> dict[str, Any]:
    """One registered method as plain data (the ``--json`` record)."""
    params = []
    for name, type_, default in cls.describe_params():
        required = isinstance(default, str) and default == "required"
        params.append({"name": name, "type": type_, "default": None if required else default, "required": required})
    return {
        "name": cls.name, "kind": cls.kind, "rotation": cls.rotation, "for_pretrained_rope": cls.for_pretrained_rope,
        "params": params, "summary": cls.summary, "reference": cls.reference,
    }


def method_records() -> list[dict[str, Any]]:
    from rope_ext.methods import REGISTRY

    return [describe(REGISTRY[name]) for name in sorted(REGISTRY)]


def format_param(param: dict[str, Any]) -> str:
    """``name: type = default``, or ``name: type (required)``."""
    if param["required"]:
        return f"{param['name']}: {param['type']} (required)"
    return f"{param['name']}: {param['type']} = {param['default']!r}"


def render_table(records: list[dict[str, Any]], width: int) -> str:
    """Aligned table: one row per method (own parameters wrapped in their column), then its summary
    and reference indented below; the parameters every method shares are listed once at the end."""
    headers = ("METHOD", "KIND", "ROTATION", "PARAMETERS")
    cols = [max(len(headers[0]), *(len(r["name"]) for r in records)),
            max(len(headers[1]), *(len(r["kind"]) for r in records)),
            max(len(headers[2]), *(len(r["rotation"]) for r in records))]
    indent = sum(cols) + 2 * len(cols)
    param_width = max(30, width - indent)
    lines = ["".join(h.ljust(c + 2) for h, c in zip(headers, cols)) + headers[3], "-" * min(width, indent + param_width)]
    for record in records:
        own = [format_param(p) for p in record["params"] if p["name"] not in COMMON]
        wrapped = textwrap.wrap(", ".join(own), param_width, break_on_hyphens=False) or ["-"]
        lead = "".join(v.ljust(c + 2) for v, c in zip((record["name"], record["kind"], record["rotation"]), cols))
        lines.append(lead + wrapped[0])
        lines.extend(" " * indent + more for more in wrapped[1:])
        for text in (record["summary"], record["reference"]):
            lines.extend(textwrap.wrap(text, max(30, width - 4), initial_indent="    ", subsequent_indent="      "))
    shared = [format_param(p) for p in records[0]["params"] if p["name"] in COMMON] if records else []
    if shared:
        lines.append("")
        lines.append("every method also takes: " + ", ".join(shared))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    records = method_records()
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        print(render_table(records, shutil.get_terminal_size((100, 24)).columns))
    return 0

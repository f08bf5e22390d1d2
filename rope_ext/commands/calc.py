"""``rope-ext calc``: the RoPE calculator.

  rope-ext calc bound --lengths 4k,32k --head-dim 128 [--plot bound.png] [--json]
      lower bound of the RoPE base for each context length (Men et al. 2024), by a scan
  rope-ext calc model MODEL --target-length 32k [--bound] [--json]
      critical dimension and extrapolation limit (Liu et al. 2023), recommended parameters per method,
      KV cache and attention FLOPs at the trained and the target length
  rope-ext calc kv MODEL --lengths 8k,32k,128k [--batch-size 1] [--dtype bfloat16] [--json]
      KV-cache bytes and attention FLOPs per length (MHA, GQA, MQA, MLA)

Lengths are tokens (32768), k = 1024 tokens (32k), M = 2^20 tokens (1M), or, where there is a MODEL,
multiples of its trained length (4x); see rope_ext.lengths. MODEL is a local checkpoint directory
(its config.json is enough), a .gguf file, or the alias smollm2.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import textwrap
from pathlib import Path
from typing import Any

from rope_ext.lengths import parse_lengths
from rope_ext.validate import COUNT, flag, integer

DEFAULT_LENGTHS = "1k,2k,4k,8k,16k,32k,64k,128k"
logger = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("calc", help="RoPE calculator: base bound, method parameters, KV/FLOP budget",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="calc_command", metavar="WHAT", required=True)

    bound = sub.add_parser("bound", help="lower bound of the RoPE base per context length (Men et al. 2024)")
    bound.add_argument("--lengths", default=DEFAULT_LENGTHS, help=f"comma-separated context lengths: tokens, 32k, 1M (default {DEFAULT_LENGTHS})")
    bound.add_argument("--head-dim", type=flag(integer, minimum=2, maximum=1 << 16), default=128, help="rotary head dimension d (even; default 128)")
    bound.add_argument("--per-decade", type=flag(integer, minimum=1, maximum=10_000), default=100, help="bases scanned per factor of 10 (default 100)")
    bound.add_argument("--plot", metavar="PNG", help="write a log-log plot of the bound against L to this .png")
    bound.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bound.set_defaults(func=run)

    model = sub.add_parser("model", help="what a target length needs and costs on a model")
    model.add_argument("model", metavar="MODEL", help="local checkpoint directory, .gguf file, or alias (smollm2)")
    model.add_argument("--target-length", required=True, help="target context length: tokens (32768, 32k) or a multiple of the model's trained length (4x)")
    model.add_argument("--method", action="append", default=None, help="only these methods (repeat or comma-separate)")
    model.add_argument("--bound", action="store_true", help="also scan the Men et al. base bound (seconds)")
    _budget_args(model)
    model.set_defaults(func=run)

    kv = sub.add_parser("kv", help="KV-cache bytes and attention FLOPs per length")
    kv.add_argument("model", metavar="MODEL", help="local checkpoint directory, .gguf file, or alias (smollm2)")
    kv.add_argument("--lengths", default=DEFAULT_LENGTHS, help=f"comma-separated lengths: tokens, 32k, or multiples of the trained length, 4x (default {DEFAULT_LENGTHS})")
    _budget_args(kv)
    kv.set_defaults(func=run)


def _budget_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=COUNT, default=1, help="sequences in the batch (default 1)")
    parser.add_argument("--dtype", default="bfloat16", help="cache dtype name (bfloat16, float32, fp8, int4 ...) or bytes per element")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def parse_dtype(text: str) -> str | float:
    from rope_ext.calc import bytes_per_element

    try:
        value: str | float = float(text)
    except ValueError:
        value = text
    bytes_per_element(value)
    return value


def human_bytes(n: float) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:g} B"


def human_flops(n: float) -> str:
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.3g} FLOP"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def render_bounds(records: list[dict[str, Any]]) -> str:
    rows = [[str(r["length"]), _g(r["first_feasible_base"]), _g(r["stable_base"]), _g(r["certified_above"]),
             str(len(r["feasible_islands"])), _g(r["published_men_et_al_2024"]), _g(r["published_su_2024"])] for r in records]
    grid = records[0]["grid"]
    head = (f"RoPE base lower bound (Men et al. 2024), head_dim {records[0]['head_dim']}; scanned {grid['bases']} bases "
            f"{grid['min_base']:.3g}..{grid['max_base']:.3g}")
    return head + "\n" + table(["L", "first feasible", "stable", "certified above", "islands", "Men et al.", "Su 2024"], rows)


def render_budget(rows: list[dict[str, Any]], kind: str) -> str:
    headers = ["L", "KV cache", "attention FLOPs (prefill)", "projection FLOPs", "attention FLOPs/decoded token"]
    body = [[str(r["length"]), human_bytes(r["kv_bytes"]), human_flops(r["attention_flops"]), human_flops(r["projection_flops"]),
             human_flops(r["decode_attention_flops_per_token"])] for r in rows]
    if kind == "MLA":
        headers.insert(2, "KV decompressed")
        for line, r in zip(body, rows):
            line.insert(2, human_bytes(r["kv_bytes_decompressed"]))
    return table(headers, body)


def shape_line(shape: dict[str, Any]) -> str:
    text = (f"{shape['kind']}: {shape['num_layers']} layers, {shape['num_heads']} heads, {shape['num_kv_heads']} KV heads, "
            f"d_qk {shape['qk_head_dim']}, d_v {shape['v_head_dim']}")
    if shape["kind"] == "MLA":
        text += f", kv_lora_rank {shape['kv_lora_rank']}, qk_rope_head_dim {shape['qk_rope_head_dim']}"
    if shape["sliding_layers"]:
        text += f", {shape['sliding_layers']} sliding layers (window {shape['sliding_window']})"
    return text


def render_model(info: dict[str, Any], batch: int, dtype: str | float) -> str:
    lines = [
        f"model: {info['model']} ({info['model_type']}; rope_ext.patch: {info['patch_support']})",
        f"rotary_dim {info['rotary_dim']} of head_dim {info['head_dim']}, rope_theta {info['rope_theta']:g}, "
        f"trained length {info['trained_length']}, target {info['target_length']} (factor {info['factor']:g})",
        f"critical dimension (Liu et al. 2023): {info['critical_dim']} of {info['rotary_dim']}; extrapolation limit "
        f"2 pi b^(d_extra/d) = {info['extrapolation_limit']:.4g} tokens; base reaching the target: {_g(info['liu_base_for_target'])}",
    ]
    for r in info.get("base_bound", []):
        lines.append(f"base bound (Men et al. 2024) at L={r['length']}: first feasible {_g(r['first_feasible_base'])}, "
                     f"stable {_g(r['stable_base'])} (model: {info['rope_theta']:g})")
    lines += ["", "recommended parameters:"]
    width = shutil.get_terminal_size((100, 24)).columns
    name_w = max(len(r["method"]) for r in info["recommendations"])
    for r in info["recommendations"]:
        params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items())
        lines.append(f"  {r['method'].ljust(name_w)}  {params}")
        lines.extend(textwrap.wrap(r["note"], max(40, width - 6), initial_indent="      ", subsequent_indent="      "))
    lines += ["", f"budget ({shape_line(info['attention'])}; batch {batch}, {dtype}):", render_budget(info["budget"], info["attention"]["kind"])]
    return "\n".join(lines)


def parse_methods(requested: list[str] | None) -> list[str] | None:
    """``--method`` values (repeated or comma-separated), checked against what the calculator covers."""
    from rope_ext.calc import RECOMMENDED_METHODS

    if not requested:
        return None
    names = [n.strip() for item in requested for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECOMMENDED_METHODS]
    if unknown or not names:
        raise ValueError(f"unknown method {', '.join(map(repr, unknown or requested))}; the calculator recommends: "
                         f"{', '.join(RECOMMENDED_METHODS)}")
    return names


def known_trained_length(config: Any) -> int | None:
    """The model's trained length for ``4x`` lengths, or None where its config does not give one."""
    from rope_ext.facts import trained_length

    try:
        return trained_length(config)
    except ValueError:
        return None


def run(args: argparse.Namespace) -> int:
    from rope_ext import calc
    from rope_ext.models import load_config

    if args.calc_command == "bound":
        lengths, head_dim = parse_lengths(args.lengths), calc.check_head_dim(args.head_dim)
        if args.plot and not str(args.plot).lower().endswith(".png"):
            raise ValueError(f"--plot must name a .png file, got {args.plot!r}")
        if args.plot and not Path(args.plot).resolve().parent.is_dir():
            raise FileNotFoundError(f"--plot directory does not exist: {str(Path(args.plot).parent)!r}")
        logger.debug("lengths in tokens: %s", ", ".join(map(str, lengths)))
        bounds = calc.base_lower_bounds(lengths, head_dim, per_decade=args.per_decade,
                                        progress=not args.json and logger.isEnabledFor(logging.INFO))
        records = [b.to_dict() for b in bounds]
        if args.plot:
            from rope_ext.calc.plot import plot_base_bounds

            plot_base_bounds(bounds, args.plot)
            logger.info("plot written to %s", args.plot)
        print(json.dumps(records, indent=2) if args.json else render_bounds(records))
        return 0
    dtype = parse_dtype(args.dtype)
    if isinstance(args.batch_size, bool) or args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.calc_command == "model":
        methods = parse_methods(args.method)
        config = load_config(args.model)
        info = {"model": str(args.model), **calc.analyze_model(config, args.target_length, batch_size=args.batch_size, dtype=dtype,
                                                               bound=args.bound, length_name="--target-length")}
        if methods:
            info["recommendations"] = [r for r in info["recommendations"] if r["method"] in methods]
        print(json.dumps(info, indent=2) if args.json else render_model(info, args.batch_size, dtype))
        return 0
    config = load_config(args.model)
    lengths = parse_lengths(args.lengths, known_trained_length(config))
    logger.debug("lengths in tokens: %s", ", ".join(map(str, lengths)))
    shape = calc.attention_shape(config)
    rows = [calc.budget(shape, n, args.batch_size, dtype) for n in lengths]
    if args.json:
        print(json.dumps({"model": str(args.model), "attention": shape.to_dict(), "budget": rows}, indent=2))
    else:
        print(f"{args.model}: {shape_line(shape.to_dict())}; batch {args.batch_size}, {dtype}\n" + render_budget(rows, shape.kind))
    return 0

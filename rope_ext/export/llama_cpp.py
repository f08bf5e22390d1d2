"""A rope_ext method as llama.cpp settings: llama-cli / llama-server flags, the GGUF metadata that
carries the same, and ``write_gguf`` (a copy of a GGUF with that metadata, tensors byte-identical).

The formula llama.cpp runs (ggml-org/llama.cpp, ``ggml/src/ggml-cpu/ops.cpp`` ``rope_yarn`` and
``ggml_rope_yarn_corr_dims``; ``src/llama-context.cpp``), with s = 1 / freq_scale:
  theta_i = p * freq_base^(-2i/n_rot);  interp = theta_i / s;
  ``--rope-scaling none``: theta_i; ``linear``: interp (``--rope-scale s`` sets freq_scale = 1/s);
  ``yarn`` (ext_factor 1): interp (1 - m_i) + theta_i m_i, m_i = 1 - clamp((i - low) / max(0.001,
  high - low), 0, 1), [low, high] = [floor(corr(beta_fast)), ceil(corr(beta_slow))] clamped to
  [0, n_rot - 1], corr(r) = n_rot ln(n_ctx_orig / (2 pi r)) / (2 ln freq_base): YaRN's ramp with
  truncation, as rope_ext's; cos/sin are multiplied by attn_factor (1 + 0.1 ln s).
The attention factor: since llama.cpp PR 17945 the context sets attn_factor = mscale(s) / (1 + 0.1
ln s) under YaRN (``--yarn-attn-factor`` is then ignored) and every version multiplies it by the
GGUF's ``{arch}.rope.scaling.attn_factor``; so cos/sin carry (0.1 ln s + 1) x that key, in old and
new versions alike. rope_ext's explicit ``attention_factor`` A is therefore exported as that key
= A / (0.1 ln s + 1) (``--override-kv`` or the written GGUF), never as ``--yarn-attn-factor``.
Not expressible and refused: dynamic methods (llama.cpp has no per-length base), ``llama3`` and
``ntk_by_parts`` (per-frequency factors: a ``rope_freqs`` tensor, not flags), YaRN without
truncation, attention-level methods, log-n scaling and rolling caches.
"""
from __future__ import annotations

import logging
import shlex
import os
from pathlib import Path
from typing import Any

from rope_ext.methods.base import Method
from rope_ext.methods.frequency import yarn_mscale

from .common import ModelFacts, check_exportable, check_method_name

logger = logging.getLogger(__name__)
EXPORTABLE = {"none": "none", "pi": "linear", "ntk": "none", "yarn": "yarn"}
METADATA_TYPES = {"type": "STRING", "factor": "FLOAT32", "original_context_length": "UINT32", "attn_factor": "FLOAT32",
                  "freq_base": "FLOAT32", "context_length": "UINT32", "yarn_beta_fast": "FLOAT32",
                  "yarn_beta_slow": "FLOAT32"}


def llama_cpp_settings(method: Method, facts: ModelFacts, context: int) -> dict[str, Any]:
    """``{"flags", "metadata", "override_kv", "command"}`` that make llama.cpp compute the bound
    ``method``'s frequencies and attention factor on ``facts``' model, serving ``context`` tokens.
    ``metadata`` maps the short names of ``METADATA_TYPES`` to values (``gguf_metadata`` gives the keys)."""
    check(method)
    scaling = EXPORTABLE[method.name]
    base = method.new_base(facts.spec) if method.name == "ntk" else facts.spec.rope_theta
    factor = method.s if scaling != "none" else 1.0
    attn = 1.0
    if method.name == "yarn" and method.attention_factor is not None:
        attn = method.attention_factor / yarn_mscale(method.s)
    flags = ["--rope-scaling", scaling, "--rope-freq-base", repr(float(base))]
    if scaling != "none":
        flags += ["--rope-scale", repr(float(factor))]
    if scaling == "yarn":
        flags += ["--yarn-orig-ctx", str(method.trained_length), "--yarn-ext-factor", "1.0",
                  "--yarn-beta-fast", repr(float(method.beta_fast)), "--yarn-beta-slow", repr(float(method.beta_slow))]
    flags += ["-c", str(context)]
    override = []
    if attn != 1.0:
        arch = _arch(facts, method)
        override = [f"{arch}.rope.scaling.attn_factor=float:{attn!r}"]
    metadata = {"type": scaling, "factor": float(factor), "original_context_length": method.trained_length,
                "attn_factor": attn, "freq_base": float(base), "context_length": context}
    if scaling == "yarn":
        metadata.update(yarn_beta_fast=float(method.beta_fast), yarn_beta_slow=float(method.beta_slow))
    command = shlex.join(["llama-server", "-m", facts.path, *flags, *(a for kv in override for a in ("--override-kv", kv))])
    return {"engine": "llama.cpp", "method": method.name, "params": {k: v for k, v in method.params().items() if v is not None},
            "flags": flags, "override_kv": override, "metadata": metadata, "command": command}


def check_name(name: str) -> None:
    """Refuse a method name llama.cpp has no setting for (before its parameters are read)."""
    check_method_name(name, "llama.cpp", EXPORTABLE)


def check(method: Method) -> None:
    """Refuse a method llama.cpp cannot run with the same formula (module docstring)."""
    truncated = getattr(method, "truncate", True)
    reason = None if truncated else "llama.cpp always truncates the YaRN correction range (truncate=False is not expressible)"
    check_exportable(method, "llama.cpp", EXPORTABLE, reason)


def _arch(facts: ModelFacts, method: Method) -> str:
    """The llama.cpp architecture name the ``--override-kv`` key needs."""
    from gguf import MODEL_ARCH_NAMES

    if facts.gguf_arch is not None:
        return facts.gguf_arch
    if facts.model_type in MODEL_ARCH_NAMES.values():
        return facts.model_type
    raise ValueError(f"{method.name} with attention_factor={method.attention_factor} needs llama.cpp's "
                     f"{{arch}}.rope.scaling.attn_factor key, and the llama.cpp architecture of model_type "
                     f"{facts.model_type!r} is not known here; export from the converted .gguf instead")


def gguf_metadata(arch: str, metadata: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{full GGUF key: (value, GGUFValueType)} for ``llama_cpp_settings(...)["metadata"]``."""
    from gguf import GGUFValueType, Keys

    keys = {"type": Keys.Rope.SCALING_TYPE, "factor": Keys.Rope.SCALING_FACTOR,
            "original_context_length": Keys.Rope.SCALING_ORIG_CTX_LEN, "attn_factor": Keys.Rope.SCALING_ATTN_FACTOR,
            "freq_base": Keys.Rope.FREQ_BASE, "context_length": Keys.LLM.CONTEXT_LENGTH,
            "yarn_beta_fast": Keys.Rope.SCALING_YARN_BETA_FAST, "yarn_beta_slow": Keys.Rope.SCALING_YARN_BETA_SLOW}
    return {keys[name].format(arch=arch): (value, GGUFValueType[METADATA_TYPES[name]]) for name, value in metadata.items()}


def check_gguf_out(source: Path, out: str | os.PathLike, force: bool) -> Path:
    """``out`` as a new GGUF path: a .gguf in an existing directory, not the source; an existing
    file only with ``force``."""
    path = Path(out)
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"--out {os.fspath(out)!r} must name a .gguf file")
    if not path.parent.resolve().is_dir():
        raise FileNotFoundError(f"--out directory does not exist: {str(path.parent)!r}")
    if path.resolve() == Path(source).resolve():
        raise ValueError(f"--out {os.fspath(out)!r} is the source model; the source is never overwritten: give another path")
    if path.exists() and not force:
        raise FileExistsError(f"--out {os.fspath(out)!r} exists; pass --force to replace it")
    return path


def write_gguf(source: str | os.PathLike, out: str | os.PathLike, metadata: dict[str, Any], *, force: bool = False) -> Path:
    """Copy the GGUF ``source`` to ``out`` with the rope metadata of ``llama_cpp_settings(...)["metadata"]``
    set (every other entry and every tensor byte-identical). Written to a temporary name in ``out``'s
    directory and renamed when complete; ``source`` is never overwritten, an existing ``out`` only with ``force``."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, Keys
    from tqdm import tqdm

    path = check_gguf_out(Path(source), out, force)
    reader = GGUFReader(source)
    arch = str(reader.get_field(Keys.General.ARCHITECTURE).contents())
    new = gguf_metadata(arch, metadata)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        writer = GGUFWriter(tmp, arch=arch, endianess=reader.endianess)
        alignment = reader.get_field(Keys.General.ALIGNMENT)
        if alignment is not None:
            writer.data_alignment = int(alignment.contents())
        for field in reader.fields.values():
            if field.name == Keys.General.ARCHITECTURE or field.name.startswith("GGUF.") or field.name in new:
                continue
            kind = field.types[0]
            sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
        for key, (value, kind) in new.items():
            writer.add_key_value(key, value, kind)
        for tensor in reader.tensors:
            writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in tqdm(reader.tensors, desc="writing tensors", unit="tensor", disable=None):
            writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("wrote %s", path)
    return path

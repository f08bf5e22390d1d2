"""Mutation check (issue 19): does the test suite catch deliberate one-line bugs in rope_ext?

For each mutation below the repository is copied (without .git, .venv, runs/ and caches) into a
scratch directory, the one line is changed there, and pytest runs in the copy. A mutation is
"caught" when pytest fails (the first failing test is reported) and MISSED when it passes. The
unmutated copy runs first; if it fails, nothing else runs.

The project is installed editable from the source tree: setuptools' finder maps ``rope_ext``,
``rope_ext.patches`` and ``rope_ext.eval`` to the source folders, and would import them from there
even inside the copy. Each run therefore puts a ``sitecustomize.py`` on PYTHONPATH that points those
mappings at the copy (in every Python process the tests start), and the copy's imports are checked
before pytest runs.

    python scripts/mutation_check.py --check                  # every mutation applies (fast)
    python scripts/mutation_check.py                          # all mutations, tests/ without slow tests
    python scripts/mutation_check.py --only ntk-exponent --tests tests/test_methods_frequency.py

Exit status: 0 all caught (or --check passed), 1 a mutation was missed, 2 bad input or a failing
unmutated copy.
"""
from __future__ import annotations

import argparse
import ast
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
IGNORED = (".git", ".venv", "runs", "__pycache__", ".pytest_cache", ".hypothesis", ".ipynb_checkpoints",
           "*.egg-info", "build", "*.pyc")
DEFAULT_TESTS = "tests"
PYTEST = ["-x", "-q", "-p", "no:cacheprovider", "-m", "not slow"]
PACKAGES = ("rope_ext", "rope_ext.patches", "rope_ext.eval")


@dataclass(frozen=True)
class Mutation:
    """One deliberate bug: the line of ``path`` whose text (indentation aside) is ``original`` becomes
    ``replacement`` (same indentation)."""

    name: str
    path: str
    original: str
    replacement: str
    description: str


MUTATIONS: tuple[Mutation, ...] = (
    Mutation("rerope-window-off-by-one", "rope_ext/methods/rerope.py",
             "if int((ctx.q_pos[:, -1] - ctx.k_pos[:, 0]).max()) < self.window:",
             "if int((ctx.q_pos[:, -1] - ctx.k_pos[:, 0]).max()) < self.window + 2:",
             "windowed methods take the plain-RoPE shortcut up to distance w + 1 (which they map below w + 1); "
             "at distance w the shortcut is exact for all three (w maps to w), so '<= w' would be an equivalent mutant"),
    Mutation("two-part-near-off-by-one", "rope_ext/kernels/two_part_merged.py",
             "near = keep & (rel < window)",
             "near = keep & (rel <= window)",
             "merged two-part kernel: the key at distance w is scored in both the near and the far part"),
    Mutation("rerope-far-sign", "rope_ext/methods/rerope.py",
             "return torch.full_like(q_pos, self.window), torch.zeros_like(k_pos)",
             "return torch.full_like(q_pos, -self.window), torch.zeros_like(k_pos)",
             "ReRoPE far part rotates queries to -w: far keys sit at relative position -w instead of w"),
    Mutation("ntk-exponent", "rope_ext/methods/frequency.py",
             "return b * s ** (d / (d - 2))",
             "return b * s ** (d / (d - 1))",
             "NTK-aware base b * s^(d/(d-1)) instead of s^(d/(d-2)) (YaRN eq. 16)"),
    Mutation("logn-dropped", "rope_ext/methods/base.py",
             "return query * logn_scale(ctx.q_pos, self.trained_length).to(query.dtype)[:, None, :, None]",
             "return query",
             "logn=True no longer scales the queries"),
    Mutation("self-extend-group-side", "rope_ext/methods/self_extend.py",
             'return torch.div(q_pos, G, rounding_mode="floor") + w - w // G, torch.div(k_pos, G, rounding_mode="floor")',
             'return torch.div(q_pos, G, rounding_mode="floor") + w - w // G, k_pos',
             "Self-Extend floors the query positions by the group but leaves the key positions ungrouped"),
    Mutation("two-part-mask-skipped", "rope_ext/kernels/two_part_merged.py",
             "keep = keep & allowed[..., start:end, first:stop]",
             "keep = keep",
             "merged two-part kernel ignores the model's mask (padding keys are attended)"),
    Mutation("rotate-half-transposed", "rope_ext/kernels/rotary_ops_torch.py",
             "rotated = x_rot * cos + torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1) * sin",
             "rotated = x_rot * cos + torch.cat((x_rot[..., half:], -x_rot[..., :half]), dim=-1) * sin",
             "torch rotary (HF tables) negates the wrong half: rotates by -m theta"),
    Mutation("yarn-mscale", "rope_ext/methods/frequency.py",
             "return 1.0 if s <= 1 else 0.1 * mscale * math.log(s) + 1.0",
             "return 1.0 if s <= 1 else 0.2 * mscale * math.log(s) + 1.0",
             "YaRN attention temperature 0.2 ln(s) + 1 instead of 0.1 ln(s) + 1 (eq. 22)"),
    Mutation("yarn-ramp-inverted", "rope_ext/methods/frequency.py",
             "keep = 1 - yarn_ramp(low, high, d // 2)",
             "keep = yarn_ramp(low, high, d // 2)",
             "YaRN interpolates the high-frequency dimensions and keeps the low ones"),
    Mutation("llama3-bands-swapped", "rope_ext/methods/frequency.py",
             "medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)",
             "medium = ~(wavelen < low_freq_wavelen) * ~(wavelen > high_freq_wavelen)",
             "Llama 3.1 scaling: the medium band's boundaries swapped (no wavelength is smoothed)"),
    Mutation("ntk-by-parts-ramp-inverted", "rope_ext/methods/frequency.py",
             "return torch.clamp((r - alpha) / (beta - alpha), 0.0, 1.0)",
             "return 1 - torch.clamp((r - alpha) / (beta - alpha), 0.0, 1.0)",
             "NTK-by-parts ramp gamma inverted: short wavelengths interpolated, long ones kept"),
    Mutation("alibi-slope-sign", "rope_ext/methods/alibi.py",
             "return -slopes.to(q_pos.device)[None, :, None, None] * rel",
             "return slopes.to(q_pos.device)[None, :, None, None] * rel",
             "ALiBi bias +m_h (i - j): far keys favoured instead of penalised"),
    Mutation("dynamic-ntk-uses-L0", "rope_ext/methods/frequency.py",
             "L = max(seq_len, L0)",
             "L = L0",
             "dynamic NTK scales from the trained length instead of the current length (never grows)"),
    Mutation("sinks-one-too-few", "rope_ext/methods/sinks.py",
             "wanted = (valid & (valid.cumsum(1) <= sinks)) | (index >= n - window)",
             "wanted = (valid & (valid.cumsum(1) < sinks)) | (index >= n - window)",
             "StreamingLLM cache keeps sinks - 1 sink tokens (and one extra recent token)"),
    Mutation("pi-divides-twice", "rope_ext/methods/frequency.py",
             "return inv_freq / s",
             "return inv_freq / s / s",
             "Position Interpolation divides theta_i by s twice"),
    Mutation("merge-weights-swapped", "rope_ext/kernels/two_part_merged.py",
             "w = torch.sigmoid(l1 - l2).nan_to_num_(0.0)[..., None]",
             "w = torch.sigmoid(l2 - l1).nan_to_num_(0.0)[..., None]",
             "log-sum-exp merge of the near and far parts weights each with the other's mass"),
    Mutation("cached-key-positions-off-by-one", "rope_ext/attention.py",
             "cached = torch.arange(past, device=q_pos.device)[None, :] + (first - past)",
             "cached = torch.arange(past, device=q_pos.device)[None, :] + (first - past + 1)",
             "decoding with a KV cache: cached keys placed one position later than they are"),
    Mutation("per-layer-table-ignored", "rope_ext/attention.py",
             "spec = runtime.specs.get(layer_type) or next(iter(runtime.specs.values()))",
             "spec = next(iter(runtime.specs.values()))",
             "attention methods rotate every layer with the first table (Gemma 3's local layers get the global base)"),
    Mutation("leaky-slope-inverted", "rope_ext/methods/rerope.py",
             "return self.window + (q_pos - self.window) / self.k, k_pos / self.k",
             "return self.window + (q_pos - self.window) * self.k, k_pos * self.k",
             "Leaky ReRoPE stretches far distances by k instead of compressing them by 1/k"),
    Mutation("sink-slots-from-one", "rope_ext/methods/sinks.py",
             "return (valid.long().cumsum(1) - 1).clamp(min=0)",
             "return valid.long().cumsum(1).clamp(min=0)",
             "StreamingLLM cache positions start at 1 instead of 0"),
)

SITECUSTOMIZE = '''"""Written by scripts/mutation_check.py: import rope_ext from the mutated copy, not the editable source."""
import os
import sys
from pathlib import Path

_SOURCE = Path(os.environ["ROPE_EXT_MUTATION_SOURCE"]).resolve()
_COPY = Path(os.environ["ROPE_EXT_MUTATION_COPY"]).resolve()
for _finder in list(sys.meta_path):
    _mapping = getattr(sys.modules.get(getattr(_finder, "__module__", ""), None), "MAPPING", None)
    if isinstance(_mapping, dict):
        for _name, _folder in list(_mapping.items()):
            _path = Path(_folder).resolve()
            if _path == _SOURCE or _SOURCE in _path.parents:
                _mapping[_name] = str(_COPY / _path.relative_to(_SOURCE))
'''


def matching_lines(mutation: Mutation, root: Path) -> list[int]:
    """Indices of the lines of ``mutation.path`` whose text, indentation aside, is ``original``."""
    path = root / mutation.path
    if not path.is_file():
        raise ValueError(f"mutation {mutation.name}: {mutation.path} does not exist under {root}")
    lines = path.read_text().splitlines()
    return [i for i, line in enumerate(lines) if line.strip() == mutation.original.strip()]


def mutated_text(mutation: Mutation, root: Path) -> str:
    """The file's text with the mutation applied; a clear error unless the line occurs exactly once
    and the result still parses."""
    found = matching_lines(mutation, root)
    if len(found) != 1:
        raise ValueError(f"mutation {mutation.name}: the line {mutation.original!r} occurs {len(found)} times in "
                         f"{mutation.path} (it must occur exactly once); update the mutation list")
    if mutation.replacement.strip() == mutation.original.strip():
        raise ValueError(f"mutation {mutation.name}: the replacement equals the original line")
    text = (root / mutation.path).read_text()
    lines = text.splitlines(keepends=True)
    line = lines[found[0]]
    indent = line[: len(line) - len(line.lstrip())]
    ending = line[len(line.rstrip("\r\n")):]
    lines[found[0]] = indent + mutation.replacement.strip() + ending
    mutated = "".join(lines)
    try:
        ast.parse(mutated)
    except SyntaxError as err:
        raise ValueError(f"mutation {mutation.name}: {mutation.path} no longer parses ({err.msg}, line {err.lineno})") from None
    return mutated


def check(mutations: tuple[Mutation, ...], root: Path) -> list[str]:
    """Problems with the list: duplicate names, lines not found exactly once, replacements that do not parse."""
    problems = []
    names = [m.name for m in mutations]
    problems += [f"duplicate mutation name {n!r}" for n in sorted({n for n in names if names.count(n) > 1})]
    for mutation in mutations:
        try:
            mutated_text(mutation, root)
        except ValueError as err:
            problems.append(str(err))
    return problems


def copy_tree(root: Path, target: Path) -> Path:
    shutil.copytree(root, target, ignore=shutil.ignore_patterns(*IGNORED), symlinks=True)
    return target


def environment(copy: Path, boot: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(boot), str(copy), *filter(None, [env.get("PYTHONPATH")])])
    env["ROPE_EXT_MUTATION_SOURCE"] = str(ROOT)
    env["ROPE_EXT_MUTATION_COPY"] = str(copy)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


class ImportFailed(RuntimeError):
    """rope_ext does not import in the copy (under a mutation: the suite would fail too)."""


def verify_imports(copy: Path, env: dict[str, str]) -> None:
    """Fail unless every rope_ext package imports, and from the copy (``python -c`` inside it)."""
    code = "import importlib; print('\\n'.join(importlib.import_module(p).__file__ for p in %r))" % (PACKAGES,)
    result = subprocess.run([sys.executable, "-c", code], cwd=copy, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise ImportFailed(f"importing rope_ext in the copy failed:\n{result.stderr[-2000:]}")
    outside = [f for f in result.stdout.split() if copy.resolve() not in Path(f).resolve().parents]
    if outside:
        raise RuntimeError(f"the copy at {copy} imports rope_ext from outside it: {', '.join(outside)}")


def first_failure(output: str, returncode: int) -> str:
    """The first test pytest reports as failed or errored, else why pytest stopped."""
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" ", 1)[1].split(" - ", 1)[0]
    return f"pytest exit {returncode} (no test named; collection or usage error)"


def run_pytest(command: list[str], cwd: Path, env: dict[str, str], timeout: float) -> tuple[int | None, str]:
    """(exit status, output) of pytest in its own process group; (None, output) after ``timeout``
    seconds, when that group (pytest and the processes its tests started) is killed."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return None, output


@dataclass
class Outcome:
    name: str
    caught: bool
    detail: str
    seconds: float


def run_one(mutation: Mutation | None, source: Path, scratch: Path, boot: Path, tests: list[str], timeout: float) -> Outcome:
    """Copy ``source``, mutate (None: unmutated), verify the imports, run pytest; the copy is removed after."""
    name = "unmutated" if mutation is None else mutation.name
    copy = copy_tree(source, scratch / name)
    start = time.monotonic()
    try:
        if mutation is not None:
            (copy / mutation.path).write_text(mutated_text(mutation, source))
        env = environment(copy, boot)
        try:
            verify_imports(copy, env)
        except ImportFailed:
            if mutation is None:
                raise
            return Outcome(name, True, "rope_ext fails to import", time.monotonic() - start)
        returncode, output = run_pytest([sys.executable, "-m", "pytest", *tests, *PYTEST], copy, env, timeout)
        if returncode is None:
            return Outcome(name, True, f"timeout after {timeout:.0f} s", time.monotonic() - start)
        if returncode == 0:
            return Outcome(name, False, "MISSED", time.monotonic() - start)
        return Outcome(name, True, first_failure(output, returncode), time.monotonic() - start)
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def table(outcomes: list[Outcome]) -> str:
    results = [f"caught: {o.detail}" if o.caught else "MISSED" for o in outcomes]
    width = max([len("mutation")] + [len(o.name) for o in outcomes])
    detail = max([len("result")] + [len(r) for r in results])
    rows = [f"{'mutation':<{width}}  {'result':<{detail}}  {'seconds':>7}", "-" * (width + detail + 11)]
    rows += [f"{o.name:<{width}}  {r:<{detail}}  {o.seconds:7.1f}" for o, r in zip(outcomes, results)]
    return "\n".join(rows)


def select(only: list[str] | None) -> tuple[Mutation, ...]:
    if not only:
        return MUTATIONS
    known = {m.name: m for m in MUTATIONS}
    unknown = [n for n in only if n not in known]
    if unknown:
        raise ValueError(f"unknown mutation(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return tuple(known[n] for n in only)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only verify that every mutation applies (fast)")
    parser.add_argument("--only", action="append", metavar="NAME", help="run this mutation only (repeatable)")
    parser.add_argument("--tests", default=DEFAULT_TESTS,
                        help=f"pytest paths / selection to run, shell-quoted (default: {DEFAULT_TESTS!r}); "
                             f"always with {shlex.join(PYTEST)}")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per pytest run (a hang counts as caught)")
    parser.add_argument("--list", action="store_true", help="print the mutations and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        mutations = select(args.only)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.list:
        for m in mutations:
            print(f"{m.name}: {m.path}: {m.description}")
        return 0
    problems = check(mutations, ROOT)
    if problems:
        print("error: the mutation list does not apply:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    if args.check:
        print(f"all {len(mutations)} mutations apply: each original line occurs exactly once and the mutated file parses")
        return 0
    tests = shlex.split(args.tests)
    with tempfile.TemporaryDirectory(prefix="rope_ext_mutation_") as tmp:
        scratch = Path(tmp)
        boot = scratch / "_boot"
        boot.mkdir()
        (boot / "sitecustomize.py").write_text(SITECUSTOMIZE)
        source = copy_tree(ROOT, scratch / "_source")  # one snapshot: edits made while this runs do not leak in
        try:
            baseline = run_one(None, source, scratch, boot, tests, args.timeout)
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if baseline.caught:
            print(f"error: the unmutated copy fails ({baseline.detail}); fix the suite first", file=sys.stderr)
            return 2
        print(f"unmutated copy passes ({baseline.seconds:.1f} s): pytest {shlex.join([*tests, *PYTEST])}")
        outcomes = []
        for mutation in tqdm(mutations, desc="mutations", unit="mutation"):
            outcome = run_one(mutation, source, scratch, boot, tests, args.timeout)
            tqdm.write(f"{outcome.name}: {'caught by ' + outcome.detail if outcome.caught else 'MISSED'} ({outcome.seconds:.1f} s)")
            outcomes.append(outcome)
    print(table(outcomes))
    missed = [o.name for o in outcomes if not o.caught]
    print(f"{len(outcomes) - len(missed)} of {len(outcomes)} caught" + (f"; MISSED: {', '.join(missed)}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The CLI's conventions: ``--version`` from the installed packages' metadata, status messages through
logging on stderr (``-q`` hides them, ``-v`` adds debug ones, stdout keeps only the output), and a
``--help`` / argument error that imports neither torch nor transformers (``import rope_ext`` is lazy)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from importlib.metadata import version

import pytest
import torch
import transformers

import rope_ext
from rope_ext import _compat, cli
from rope_ext.cli import main

HEAVY = ("torch", "transformers", "numpy")
TINY_BOUND = ["calc", "bound", "--lengths", "1k", "--head-dim", "8", "--per-decade", "1"]


def python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object as its last line."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def help_paths(parser: argparse.ArgumentParser, path: list[str]) -> list[list[str]]:
    """Every (sub)command path whose parser has its own -h (lm-eval hands every argument to lm-eval)."""
    paths = [path] if "-h" in parser._option_string_actions else []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                paths += help_paths(child, [*path, name])
    return paths


def test_building_the_parser_imports_neither_torch_nor_transformers():
    found = python(f"""
        import json, sys
        import rope_ext.cli
        rope_ext.cli.build_parser()
        print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
    """)
    assert found == []


def test_every_help_and_argument_errors_exit_without_importing_torch():
    paths = help_paths(cli.build_parser(), [])
    assert ["calc", "bound"] in paths and ["eval", "stream"] in paths and [] in paths
    assert len(paths) >= len(cli.COMMANDS)
    bad = [["calc", "bound", "--head-dim", "x"], ["eval", "ppl", "--model", "m", "--run-dir", "r", "--seed", "-1"],
           ["generate"], ["no-such-command"], ["-q", "-v", "methods"]]
    result = python(f"""
        import contextlib, io, json, sys
        from rope_ext.cli import main
        codes = {{}}
        for argv in {[[*p, "--help"] for p in paths]!r} + {bad!r}:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                codes[" ".join(argv)] = main(argv)
        print(json.dumps({{"codes": codes, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
    """)
    assert result["heavy"] == []
    assert {argv: code for argv, code in result["codes"].items() if argv.endswith("--help") and code != 0} == {}
    assert [result["codes"][" ".join(argv)] for argv in bad] == [2] * len(bad)


def test_version_flag_names_the_installed_versions(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert out.startswith(f"rope-ext {version('rope-ext')} (")
    assert f"torch {torch.__version__}," in out and f"transformers {transformers.__version__}," in out
    assert rope_ext.__version__ == version("rope-ext")


def test_version_in_a_fresh_process():
    """``--version`` prints one line and nothing on stderr -- but the import's warning when the
    installed transformers is newer than the newest tested (a release after ours must not fail it)."""
    done = subprocess.run([sys.executable, "-m", "rope_ext.cli", "--version"], capture_output=True, text=True, timeout=120)
    newer = _compat._parse(transformers.__version__) > _compat.TESTED[1]
    stderr = done.stderr
    if newer:
        lines = stderr.splitlines()
        assert len(lines) == 2 and "UserWarning: rope-ext is tested with transformers" in lines[0], stderr
        stderr = ""
    assert done.returncode == 0 and stderr == ""
    assert done.stdout.split()[:2] == ["rope-ext", version("rope-ext")]


def bound_run(capsys, tmp_path, *flags: str) -> tuple[list[dict], str]:
    png = tmp_path / "bound.png"
    assert main([*flags, *TINY_BOUND, "--plot", str(png), "--json"]) == 0
    captured = capsys.readouterr()
    assert png.is_file()
    return json.loads(captured.out), captured.err


def test_quiet_hides_status_verbose_adds_debug_and_stdout_is_the_same(capsys, tmp_path):
    plain, plain_err = bound_run(capsys, tmp_path)
    quiet, quiet_err = bound_run(capsys, tmp_path, "-q")
    verbose, verbose_err = bound_run(capsys, tmp_path, "-v")
    assert plain == quiet == verbose
    assert f"rope-ext: plot written to {tmp_path / 'bound.png'}" in plain_err.splitlines()
    assert "debug" not in plain_err
    assert quiet_err == ""
    assert "rope-ext: debug: lengths in tokens: 1024" in verbose_err.splitlines()
    assert f"rope-ext: plot written to {tmp_path / 'bound.png'}" in verbose_err.splitlines()


def test_quiet_also_hides_the_progress_bar(capsys):
    assert main(TINY_BOUND) == 0
    shown = capsys.readouterr()
    assert main(["-q", *TINY_BOUND]) == 0
    hidden = capsys.readouterr()
    assert "base bound scan" in shown.err and hidden.err == ""
    assert shown.out == hidden.out and "first feasible" in shown.out


def test_quiet_and_verbose_together_is_one_error_line(capsys):
    assert main(["-q", "-v", "methods"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "-q/--quiet" in err[0] and "-v/--verbose" in err[0]


def test_lazy_package_keeps_its_api_and_checks_transformers_at_import():
    api = python("""
        import json, sys
        from rope_ext.patch import build_method   # the submodule rope_ext.patch, imported first
        import rope_ext
        from rope_ext import patch, load
        print(json.dumps({
            "patch_is_function": rope_ext.patch is patch is sys.modules["rope_ext.patch"].patch,
            "load": load is sys.modules["rope_ext.models"].load,
            "all_resolve": all(getattr(rope_ext, n) is not None for n in rope_ext.__all__),
            "dir": sorted(set(rope_ext.__all__) - set(dir(rope_ext))),
            "submodule": rope_ext.lengths.parse_length("1k"),
        }))
    """)
    assert api == {"patch_is_function": True, "load": True, "all_resolve": True, "dir": [], "submodule": 1024}
    refused = python("""
        import importlib.metadata, json
        real = importlib.metadata.version
        importlib.metadata.version = lambda name: "6.0.0" if name == "transformers" else real(name)
        try:
            import rope_ext
            print(json.dumps("imported"))
        except ImportError as err:
            print(json.dumps(str(err)))
    """)
    assert "rope-ext needs transformers >= 5.15 and < 6.0" in refused and "found 6.0.0" in refused


def test_an_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'rope_ext' has no attribute 'no_such_name'"):
        rope_ext.no_such_name  # noqa: B018


@pytest.fixture
def captured_configs(monkeypatch):
    """``rope-ext pretrain`` with the training replaced by recording the config it was given."""
    from rope_ext.eval import lab, lab_passkey, runner

    seen = []
    monkeypatch.setattr(lab, "pretrain", lambda cfg, out: seen.append(cfg) or out)
    monkeypatch.setattr(lab_passkey, "finetune_passkey", lambda init, cfg, out: seen.append(cfg) or out)
    monkeypatch.setattr(lab, "is_complete", lambda path: str(path) == "lm-dir")
    monkeypatch.setattr(runner, "set_threads", lambda threads: 1)
    return seen


def test_pretrain_uses_the_values_given_and_the_configs_own_defaults(captured_configs, tmp_path):
    from rope_ext.eval.lab import LabConfig
    from rope_ext.eval.lab_passkey import PasskeyLabConfig

    assert main(["pretrain", "--out", str(tmp_path / "a")]) == 0
    assert main(["pretrain", "--out", str(tmp_path / "b"), "--context", "64", "--position", "alibi", "--lr", "0.01"]) == 0
    assert main(["pretrain", "--out", str(tmp_path / "c"), "--task", "passkey", "--init", "lm-dir", "--batch", "3"]) == 0
    assert captured_configs == [LabConfig(), LabConfig(context=64, position="alibi", lr=0.01), PasskeyLabConfig(batch=3)]


@pytest.mark.parametrize("flags,message", [
    (["--task", "passkey", "--init", "lm-dir", "--context", "64", "--heads", "2"], "--context, --heads: --task lm only"),
    (["--init", "lm-dir"], "--init 'lm-dir': --task passkey only"),
])
def test_pretrain_refuses_flags_its_task_would_ignore(captured_configs, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert main(["pretrain", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and message in err[0]
    assert captured_configs == [] and not out.exists()

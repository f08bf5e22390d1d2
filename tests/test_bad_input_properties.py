"""Property-based bad input (hypothesis): every registered method's every parameter, and every
numeric flag of every subcommand, given wrong types, NaN / infinities, zero, negatives, huge values
and empty text. Each is either refused with a clear error that names the parameter -- the model
bitwise untouched, argparse's exit status 2 and one error line for a flag -- or accepted and then
used exactly: a finite result, the flag's value equal to the number written. Examples are
derandomized (the same every run, so CI is deterministic); ``--hypothesis-seed=N`` with
``derandomize`` off explores new ones (how yarn's beta_slow=2e-313 overflow was found)."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math

import pytest
import torch
from conftest import make_tiny
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from registry_suite import assert_same, snapshot

import rope_ext
from rope_ext import validate
from rope_ext.cli import build_parser

LENGTH = 48
BAD_NUMBERS = st.sampled_from([math.nan, math.inf, -math.inf, 0, 0.0, -1, -1.5, 1e30, 2**62, -(2**62), 1e-300, 5e-324])
WRONG_TYPES = st.sampled_from(["8", "", b"8", [8], {"x": 1}, (8,), object(), True, False, 8j])
BAD_VALUES = st.one_of(BAD_NUMBERS, WRONG_TYPES, st.floats(allow_nan=True, allow_infinity=True), st.integers())
BAD_TEXT = st.one_of(st.sampled_from(["nan", "inf", "-inf", "0", "-1", "", " ", "1e400", "abc", "1.5", "0x10", "1_000",
                                      "99999999999999999999", "-0", "+3", "1e-400", "٣"]), st.text(max_size=12))

MODEL = make_tiny("llama")
IDS = torch.randint(3, 97, (1, LENGTH), generator=torch.Generator().manual_seed(0))
BEFORE = snapshot(MODEL)
PLAIN = MODEL(IDS).logits


def method_fields() -> list[tuple[str, str]]:
    return [(name, f.name) for name in rope_ext.methods.names() for f in dataclasses.fields(rope_ext.methods.get(name))]


@pytest.mark.parametrize("name,field", method_fields(), ids=lambda x: x)
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(value=BAD_VALUES)
def test_a_bad_method_parameter_is_refused_by_name_or_used(name, field, value):
    params = rope_ext.methods.get(name).defaults_for(rope_ext.facts.rope_spec(MODEL), LENGTH)
    params[field] = value
    try:
        handle = rope_ext.patch(MODEL, name, **params)
    except (TypeError, ValueError) as err:
        assert field in str(err) or "give sinks and cache_window together" in str(err), f"{name}.{field}={value!r}: {err}"
        assert rope_ext.current(MODEL) is None
        assert_same(BEFORE, snapshot(MODEL))
        return
    try:
        assert handle.method.params()[field] == value or field == "original_max_position_embeddings"
        out = MODEL(IDS).logits
        assert torch.isfinite(out).all(), f"{name}.{field}={value!r} was accepted and gave non-finite logits"
    finally:
        rope_ext.unpatch(MODEL)
    assert torch.equal(MODEL(IDS).logits, PLAIN)


def numeric_flags() -> list[tuple[list[str], argparse.Action]]:
    """(subcommand path, action) for every flag that takes a number, found by walking the parser."""
    found = []

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, path + [name])
            elif action.option_strings and action.type is not None and getattr(action.type, "__name__", "") in (
                    "integer", "number", "int", "float"):
                found.append((path, action))
    walk(build_parser(), [])
    return found


def required_arguments(path: list[str]) -> list[str]:
    """The minimum other arguments each subcommand needs to parse."""
    needs = {"eval": ["--model", "m", "--run-dir", "r"], "generate": ["--model", "m", "--prompt", "p", "--max-new-tokens", "4"],
             "pretrain": ["--out", "o"], "calc": [], "finetune": [], "recommend": ["m", "--target-length", "64"],
             "export": ["m", "--method", "pi", "--to", "vllm"]}
    extra = needs.get(path[0], [])
    if path[:2] == ["eval", "stream"]:
        extra = extra + ["--tokens", "64"]
    if path[:2] == ["calc", "model"] or path[:2] == ["calc", "kv"]:
        extra = ["m"] + (["--target-length", "64"] if path[1] == "model" else [])
    return path + extra


FLAGS = numeric_flags()


def test_every_numeric_flag_goes_through_the_validation_layer():
    bare = [f"{' '.join(path)} {action.option_strings[-1]}" for path, action in FLAGS if action.type in (int, float)]
    assert not bare, f"flags parsed by bare int/float (no range, NaN accepted): {bare}"
    assert len(FLAGS) >= 30


@pytest.mark.parametrize("path,action", FLAGS, ids=lambda x: x if isinstance(x, list) else x.option_strings[-1])
@settings(max_examples=30, deadline=None, derandomize=True)
@given(raw=BAD_TEXT)
def test_a_bad_flag_exits_2_with_one_line_naming_it_or_is_used_exactly(path, action, raw):
    assume(raw != "--")  # argparse itself turns "--flag=--" into [] without calling the flag's type
    flag = action.option_strings[-1]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = build_parser().parse_args(required_arguments(path) + [f"{flag}={raw}"])
    except SystemExit as exit:
        err = stderr.getvalue().strip().splitlines()
        assert exit.code == 2 and err and f"argument {flag}" in err[-1] and "Traceback" not in "\n".join(err)
        return
    value = getattr(args, action.dest)
    assert isinstance(value, (int, float)) and math.isfinite(value)
    assert value == (int(raw) if action.type.__name__ == "integer" else float(raw))


@pytest.mark.parametrize("value,bounds,ok", [
    (3, {"minimum": 1, "maximum": 3}, True), (4, {"maximum": 3}, False), (True, {}, False), (3.0, {}, False),
])
def test_integer_checks_type_and_both_ends(value, bounds, ok):
    if ok:
        assert validate.integer(value, "n", **bounds) == value
    else:
        with pytest.raises((TypeError, ValueError), match="^n must be"):
            validate.integer(value, "n", **bounds)


@settings(derandomize=True)
@given(x=st.floats(allow_nan=True, allow_infinity=True))
def test_number_accepts_exactly_the_finite_values_in_range(x):
    inside = math.isfinite(x) and 0 < x <= 10
    try:
        assert validate.number(x, "x", above=0, at_most=10) == x and inside
    except ValueError as err:
        assert not inside and str(err).startswith("x must be")

"""The transformers version check at import, and the KV-cache keyword of the installed version."""
from __future__ import annotations

import warnings

import pytest
from conftest import make_tiny

from rope_ext._compat import TESTED, cache_kwarg, check_transformers


@pytest.mark.parametrize("installed", ["4.57.6", "5.0.0", "5.14.1", "6.0.0", "6.1.0.dev0"])
def test_outside_the_supported_range_is_a_clear_error(installed):
    with pytest.raises(ImportError, match=rf"transformers >= 5\.15 and < 6\.0.*found {installed}\..*pip install 'transformers>=5\.15,<6'"):
        check_transformers(installed)


@pytest.mark.parametrize("installed", ["5.15.0", "5.20.2", f"{TESTED[1][0]}.{TESTED[1][1]}.0", f"{TESTED[1][0]}.{TESTED[1][1]}.1rc0"])
def test_tested_versions_pass_silently(installed):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_transformers(installed)


def test_a_newer_5x_than_tested_warns_and_names_both():
    newer = f"5.{TESTED[1][1] + 3}.0"
    with pytest.warns(UserWarning, match=rf"tested with transformers 5\.15 to 5\.{TESTED[1][1]}; found {newer}"):
        check_transformers(newer)


def test_cache_keyword_is_one_forward_accepts():
    import inspect

    model = make_tiny("llama")
    assert cache_kwarg(model) in inspect.signature(model.forward).parameters

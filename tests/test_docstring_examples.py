"""The examples in the public API's docstrings run and print what they say (``help()`` shows them to users)."""
from __future__ import annotations

import doctest
import importlib
import sys

import pytest
import torch

MODULES = ("mpdistil_fast.functional.kd_kl_div", "mpdistil_fast.functional.hidden_mse",
           "mpdistil_fast.functional.meta_teacher_loss", "mpdistil_fast.modules.kd_loss",
           "mpdistil_fast.modules.hidden_mse_loss", "mpdistil_fast.modules.meta_teacher",
           "mpdistil_fast.bilevel.hypergradient", "mpdistil_fast.methods.curriculum")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    importlib.import_module(name)
    module = sys.modules[name]  # (mpdistil_fast.bilevel.hypergradient is also a function of that package)
    finder = doctest.DocTestFinder()
    tests = [test for test in finder.find(module) if test.examples]
    assert tests, f"{name} has no docstring example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    with torch.random.fork_rng():  # (an example may seed the global generator)
        for test in tests:
            runner.run(test)
    assert runner.failures == 0, f"{runner.failures} docstring example(s) of {name} failed (see the output above)"

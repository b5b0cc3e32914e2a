"""One error base: every exception class fastmid defines is a FastmidError, so the CLI's single
``except FastmidError`` turns each into one line and its exit code (warnings are not errors)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from fastmid.errors import FastmidError


def _exception_classes() -> list[type[BaseException]]:
    import fastmid.kernels

    found = []
    # fastmid.kernels lives in the top-level kernels/ folder, outside fastmid.__path__
    infos = [
        *pkgutil.walk_packages(fastmid.__path__, "fastmid."),
        *pkgutil.walk_packages(fastmid.kernels.__path__, "fastmid.kernels."),
    ]
    for info in infos:
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and not issubclass(obj, Warning)
                and obj.__module__ == module.__name__
            ):
                found.append(obj)
    return found


def test_every_fastmid_exception_is_a_fastmid_error():
    classes = _exception_classes()
    # the walk reaches the kernels (installed as fastmid.kernels) and every layer above them
    modules = {cls.__module__ for cls in classes}
    assert {"fastmid.kernels._triton", "fastmid.config", "fastmid.train.recipe"} <= modules
    outside = [
        f"{c.__module__}.{c.__qualname__}" for c in classes if not issubclass(c, FastmidError)
    ]
    assert outside == []


def test_exit_codes():
    from fastmid.train.recipe import NonFiniteLossError, RunFolderError, TrainingInterrupted

    assert FastmidError.exit_code == RunFolderError.exit_code == 2
    assert NonFiniteLossError.exit_code == 1
    assert TrainingInterrupted.exit_code == 130


def test_the_cli_catches_only_fastmid_error():
    source = inspect.getsource(importlib.import_module("fastmid.cli"))
    caught = {
        line.split("except", 1)[1].split(" as ")[0].strip(" :")
        for line in source.splitlines()
        if line.strip().startswith("except ")
    }
    assert "FastmidError" in caught
    error_classes = {c.__name__ for c in _exception_classes()} - {"FastmidError"}
    assert not caught & error_classes, caught

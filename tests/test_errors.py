"""Every error type the pipeline raises crosses a process boundary intact: the benchmarks, the candidates and
the llama.cpp checks run in processes of their own, and a user's message must come back from them whole."""

from __future__ import annotations

import importlib
import inspect
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pipeline

# the errors whose __init__ takes more than a message, built as the pipeline builds them
CUSTOM_ARGS = {
    "RecipeError": lambda cls: cls(
        "recipe.yaml:3: train.lr: must be below 1", {"train": {"lr": 3}}, {}, Path("recipe.yaml"), {"train"}
    ),
    "EmptyField": lambda cls: cls("train.jsonl:4", "text", "data.prompt"),
    "RequestError": lambda cls: cls(400, "messages: must be a list"),
}


def error_types() -> list[type[BaseException]]:
    """Every exception class defined in the package's modules (namespace folders such as stages/ included)."""
    root = Path(pipeline.__file__).parent
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[1] == "metrics" and len(parts) > 2 or parts[-1] == "__main__":  # evaluate modules; the CLI
            continue
        module = importlib.import_module(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == module.__name__:
                found[cls.__qualname__] = cls
    return sorted(found.values(), key=lambda c: c.__qualname__)


def build(cls):
    if cls.__qualname__ in CUSTOM_ARGS:
        return CUSTOM_ARGS[cls.__qualname__](cls)
    assert cls.__init__ in (BaseException.__init__, Exception.__init__), (
        f"{cls.__qualname__} takes {inspect.signature(cls.__init__)}: add it to CUSTOM_ARGS"
    )
    return cls(f"{cls.__qualname__}: what went wrong, and what to do")


def _raise(error):
    raise error


def test_the_package_has_error_types():
    names = {cls.__qualname__ for cls in error_types()}
    assert {"PipelineError", "RecipeError", "RemoteError", "RunLocked", "RuntimeFailure", "GatesFailed"} <= names


def test_every_error_type_comes_back_from_a_child_process_with_its_message_and_exit_code():
    errors = [build(cls) for cls in error_types()]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        for error in errors:
            try:
                pool.submit(_raise, error).result()
            except BaseException as back:  # noqa: BLE001 - the error the child raised, as the parent receives it
                assert type(back) is type(error)
                assert str(back) == str(error)
                assert getattr(back, "exit_code", None) == getattr(error, "exit_code", None)
                for name, value in vars(error).items():
                    assert getattr(back, name) == value, (type(error).__qualname__, name)
            else:
                raise AssertionError(f"{type(error).__qualname__} was not raised")

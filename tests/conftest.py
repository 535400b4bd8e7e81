"""Shared fixtures: tiny random-init models built from a config, and small recipes that use them."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from pipeline.data import read_jsonl
from pipeline.testing.tiny_models import build_tiny_models

REPO = Path(__file__).resolve().parent.parent
INTENTS = REPO / "data" / "intents"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    corpus = [row["text"] for _, row in read_jsonl(INTENTS / "train.jsonl")] + [
        row["label"] for _, row in read_jsonl(INTENTS / "train.jsonl")
    ]
    return build_tiny_models(corpus, tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe file (dedented YAML) into tmp_path and return its path."""

    def write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip())
        return path

    return write


@pytest.fixture
def intents_rows(tmp_path) -> tuple[Path, Path]:
    """Small train/eval files from the shipped task: 96 and 24 rows."""
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    for src, dst, n in ((INTENTS / "train.jsonl", train, 96), (INTENTS / "test.jsonl", test, 24)):
        rows = [row for _, row in read_jsonl(src)][:n]
        dst.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return train, test


def tiny_recipe_text(tiny_models: dict[str, Path], train: Path, test: Path) -> str:
    """The tiny recipe: the tiny base on the small intents files, a tiny reference, every default variant."""
    return textwrap.dedent(f"""
        name: tiny-test
        model:
          base: {tiny_models["base"]}
        data:
          train: {train}
          eval: {test}
          prompt: "Message: {{text}}\\nIntent:"
          target: " {{label}}"
          chat_template: never
        train:
          epochs: 2
          batch_size: 16
          lr: 5.0e-3
          save_steps: 4
        evaluate:
          max_new_tokens: 6
          batch_size: 8
          bootstrap_samples: 200
          reference:
            model: {tiny_models["reference"]}
          gates:
            quantized_max_drop: 1.0
    """).lstrip()


def tiny_run_folder(folder: Path, tiny_models: dict[str, Path]) -> Path:
    """The tiny recipe and its small intents files (96 and 24 rows) in `folder`, for a module's shared run."""
    train, test = folder / "train.jsonl", folder / "test.jsonl"
    for src, dst, n in ((INTENTS / "train.jsonl", train, 96), (INTENTS / "test.jsonl", test, 24)):
        dst.write_text("".join(json.dumps(row) + "\n" for _, row in list(read_jsonl(src))[:n]))
    recipe = folder / "recipe.yaml"
    recipe.write_text(tiny_recipe_text(tiny_models, train, test))
    return recipe


@pytest.fixture
def tiny_recipe(write_recipe, tiny_models, intents_rows) -> Path:
    return write_recipe(tiny_recipe_text(tiny_models, *intents_rows))

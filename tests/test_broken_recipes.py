"""Every recipe in tests/broken_recipes/ is rejected by `validate` with the message its first line expects.

Each file starts with `# expect: MESSAGE`, where RECIPE stands for the recipe's path and DIR for its
folder; TINY_BASE / TINY_REFERENCE in a file are replaced by the tiny test models' folders.
"""

import shutil
from pathlib import Path

import pytest

from pipeline.cli import main

CORPUS = Path(__file__).parent / "broken_recipes"
RECIPES = sorted(CORPUS.glob("*.yaml"))


def test_the_corpus_is_large():
    assert len(RECIPES) >= 25


@pytest.mark.parametrize("source", RECIPES, ids=lambda p: p.stem)
def test_broken_recipe_is_rejected_with_file_line_and_fix(source, tiny_models, tmp_path, capsys):
    folder = tmp_path / "recipes"
    shutil.copytree(CORPUS, folder)
    recipe = folder / source.name
    text = recipe.read_text()
    expect = text.splitlines()[0].removeprefix("# expect: ")
    recipe.write_text(
        text.replace("TINY_BASE", str(tiny_models["base"])).replace("TINY_REFERENCE", str(tiny_models["reference"]))
    )
    expect = expect.replace("RECIPE", str(recipe)).replace("DIR", str(folder))

    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert expect in err
    assert "Traceback" not in err


SHIPPED = sorted(Path(__file__).parent.parent.joinpath("recipes").rglob("*.yaml"))
FRAGMENTS = {"base.yaml"}  # extended by the others, not run on its own


@pytest.mark.parametrize("recipe", [r for r in SHIPPED if r.name not in FRAGMENTS], ids=lambda p: p.name)
def test_every_shipped_recipe_loads(recipe):
    from pipeline.recipe import load_recipe

    assert load_recipe(recipe).recipe.name


def test_each_fragment_is_extended_by_a_shipped_recipe():
    for fragment in FRAGMENTS:
        assert any(f"extends: {fragment}" in r.read_text() for r in SHIPPED if r.name != fragment), fragment

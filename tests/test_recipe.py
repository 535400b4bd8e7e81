from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.recipe import load_recipe

MINIMAL = """
name: t
model:
  base: org/model
data:
  train: train.jsonl
  eval: test.jsonl
  prompt: "{text}"
  target: "{label}"
"""


def error_of(path: Path, overrides=()) -> str:
    with pytest.raises(PipelineError) as e:
        load_recipe(path, list(overrides))
    return str(e.value)


def test_minimal_recipe_gets_schema_defaults_and_paths_relative_to_the_recipe(write_recipe, tmp_path):
    loaded = load_recipe(write_recipe(MINIMAL))
    assert loaded.recipe.lora.r == 16
    assert [v.kind for v in loaded.recipe.quantize] == ["bnb-nf4", "bnb-int8"]
    assert loaded.recipe.data.train == str(tmp_path / "train.jsonl")
    assert loaded.recipe.model.base == "org/model"  # not a folder here: stays a Hub id
    assert len(loaded.run_id) == 12


def test_misspelled_key_names_file_line_field_and_suggestion(write_recipe):
    path = write_recipe(MINIMAL + "lora:\n  rank: 8\n")
    assert error_of(path) == f"{path}:10: lora.rank: unknown key (did you mean 'lora.r'?)"


def test_all_errors_are_reported_at_once(write_recipe):
    path = write_recipe(MINIMAL + "train:\n  epochs: three\n  lr: -1\n")
    message = error_of(path)
    assert f"{path}:10: train.epochs: Input should be a valid number" in message
    assert f"{path}:11: train.lr: Input should be greater than 0" in message


def test_missing_required_field(write_recipe):
    path = write_recipe("name: t\nmodel:\n  base: org/m\n")
    assert error_of(path) == f"{path}:1: data: required field is missing"


def test_extends_merges_sections_and_the_child_wins(write_recipe):
    write_recipe(MINIMAL + "train:\n  lr: 0.01\n  epochs: 2\n", name="parent.yaml")
    child = write_recipe("extends: parent.yaml\nname: child\ntrain:\n  epochs: 5\n")
    recipe = load_recipe(child).recipe
    assert (recipe.name, recipe.train.epochs, recipe.train.lr) == ("child", 5, 0.01)


def test_extends_cycle_is_reported(write_recipe):
    write_recipe("extends: b.yaml\nname: a\n", name="a.yaml")
    b = write_recipe("extends: a.yaml\nname: b\n", name="b.yaml")
    assert "cycle in recipe inheritance" in error_of(b)


def test_error_in_parent_names_the_parent_file_and_line(write_recipe):
    parent = write_recipe(MINIMAL + "lora:\n  alpah: 3\n", name="parent.yaml")
    child = write_recipe("extends: parent.yaml\nname: child\n")
    assert error_of(child) == f"{parent}:10: lora.alpah: unknown key (did you mean 'lora.alpha'?)"


def test_set_overrides_win_and_are_typed_by_the_schema(write_recipe):
    loaded = load_recipe(write_recipe(MINIMAL), ["train.epochs=3", "train.lr=1e-3", "lora.target_modules=[q_proj]"])
    assert loaded.recipe.train.epochs == 3.0
    assert loaded.recipe.train.lr == 0.001
    assert loaded.recipe.lora.target_modules == ["q_proj"]
    assert loaded.run_id != load_recipe(write_recipe(MINIMAL)).run_id


def test_bad_override_is_named(write_recipe):
    path = write_recipe(MINIMAL)
    assert error_of(path, ["train.epochs"]).startswith("--set 'train.epochs': expected key.path=value")
    assert (
        error_of(path, ["train.lr=fast"])
        == "--set: train.lr: Input should be a valid number, unable to parse string as a number"
    )


def test_broken_yaml_names_the_line(write_recipe):
    path = write_recipe("name: t\nmodel: {base: x\ndata: 1\n")
    assert error_of(path).startswith(f"{path}:3: invalid YAML")


def test_empty_file_and_a_list_at_top_level(write_recipe):
    assert "the recipe is empty" in error_of(write_recipe("", name="empty.yaml"))
    assert "must be a mapping" in error_of(write_recipe("- a\n- b\n", name="list.yaml"))


def test_unknown_quantize_kind_in_a_list(write_recipe):
    path = write_recipe(MINIMAL + "quantize:\n  - kind: bnb-nf4\n  - kind: gptq\n")
    kinds = "'bnb-nf4', 'bnb-int8', 'gguf' or 'gguf-lora'"
    assert error_of(path).startswith(f"{path}:11: quantize.1.kind: Input should be {kinds}")


def test_schema_json_is_current():
    from pipeline.recipe import json_schema

    shipped = Path(__file__).parent.parent / "recipes" / "schema.json"
    assert shipped.read_text() == json_schema(), "recipes/schema.json is stale: run `make schema`"
    from pipeline import report_types, result_types

    report = Path(__file__).parent.parent / "recipes" / "report.schema.json"
    assert report.read_text() == report_types.json_schema(), "recipes/report.schema.json is stale: `make schema`"
    for name, text in result_types.json_schemas().items():
        assert (report.parent / name).read_text() == text, f"recipes/{name} is stale: `make schema`"


def test_every_field_has_a_description():
    from pydantic import BaseModel

    from pipeline.recipe import Recipe, _model_in

    undocumented, todo = [], [Recipe]
    while todo:
        model = todo.pop()
        for name, info in model.model_fields.items():
            if not info.description:
                undocumented.append(f"{model.__name__}.{name}")
            nested = _model_in(info.annotation)
            if nested and issubclass(nested, BaseModel):
                todo.append(nested)
    assert undocumented == []


def test_yaml_means_what_it_looks_like(write_recipe):
    """YAML 1.1 would read `no` as False, 8:00:00 as 28800 and 0755 as octal 493; the recipe loader reads
    YAML 1.2's core schema, and bool fields still take yes/no/on/off."""
    path = write_recipe(
        MINIMAL
        + "  split_seed: 0755\n"
        + "  packing: yes\n"
        + "train: {qlora: off, lr: 1e-3}\n"
        + "launch: {time: 8:00:00}\n"
        + "distill:\n  inputs: train.jsonl\n  choices: [yes, no, on, off, null_label]\n"
        + "evaluate:\n  reference: {model: org/big}\n"
    )
    recipe = load_recipe(path).recipe
    assert recipe.data.split_seed == 755
    assert recipe.data.packing is True and recipe.train.qlora is False
    assert recipe.train.lr == 0.001
    assert recipe.launch.time == "8:00:00"
    assert recipe.distill.choices == ["yes", "no", "on", "off", "null_label"]


def test_overrides_read_values_like_the_file(write_recipe):
    loaded = load_recipe(write_recipe(MINIMAL), ["launch.time=1:30:00", "data.split_seed=010"])
    assert loaded.recipe.launch.time == "1:30:00" and loaded.recipe.data.split_seed == 10


def test_a_byte_order_mark_and_crlf_line_ends_are_read_as_written(write_recipe, tmp_path):
    path = tmp_path / "windows.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + MINIMAL.lstrip().replace("\n", "\r\n").encode())
    assert load_recipe(path).recipe.data.prompt == "{text}"


def test_anchors_and_merge_keys_work_and_are_not_duplicates(write_recipe):
    path = write_recipe(
        MINIMAL
        + "lora:\n  <<: {r: 8, alpha: 16}\n  dropout: 0.1\n"
        + "evaluate:\n  reference: {model: org/big, prompt: &p 'Classify: {text}'}\n"
        + "distill: {inputs: train.jsonl, teacher: {model: org/big, prompt: *p}}\n"
    )
    recipe = load_recipe(path).recipe
    assert (recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout) == (8, 16, 0.1)
    assert recipe.distill.teacher.prompt == recipe.evaluate.reference.prompt == "Classify: {text}"

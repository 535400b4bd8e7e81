"""Quantize stage: merge the adapter into the full-precision base, then build each quantized variant.

Writes quantize/merged/ (the specialized model as one plain checkpoint) and quantize/<kind>/ per
variant in the recipe (bitsandbytes nf4 / int8, serialized with save_pretrained), plus result.json
with each variant's size on disk and in memory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline import models
from pipeline.errors import PipelineError
from pipeline.recipe import LoadedRecipe
from pipeline.runs import (
    dir_size_bytes,
    done_fingerprint,
    log,
    mark_done,
    replace_dir,
    stage_fingerprint,
    temp_dir_for,
    write_json_atomic,
)

STAGE = "quantize"


def fingerprint(loaded: LoadedRecipe, run_dir: Path) -> str:
    return stage_fingerprint(
        STAGE, done_fingerprint(run_dir / "train"), [v.model_dump() for v in loaded.recipe.quantize]
    )


def run(loaded: LoadedRecipe, run_dir: Path) -> dict:
    from peft import PeftModel

    recipe = loaded.recipe
    adapter_dir = run_dir / "train" / "adapter"
    if done_fingerprint(run_dir / "train") is None or not adapter_dir.is_dir():
        raise PipelineError(
            f"{run_dir}: no finished train stage to quantize; run `make train RECIPE={loaded.path}` first"
        )
    stage_dir = run_dir / STAGE
    stage_dir.mkdir(parents=True, exist_ok=True)

    # Merge in float32 so the adapter's small deltas are not rounded away, then store in the compute dtype.
    source = models.resolve_model(recipe.model.base)
    base = models.load_model(source, torch.float32, trust_remote_code=recipe.model.trust_remote_code)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.to(models.compute_dtype(recipe.model.dtype))
    tokenizer = models.load_tokenizer(models.ModelSource(str(adapter_dir), None, is_local=True))
    merged_dir = stage_dir / "merged"
    tmp = temp_dir_for(merged_dir)
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, merged_dir)
    variants = {"merged": _facts(merged, merged_dir)}
    del base, merged
    log(STAGE, f"merged: {variants['merged']['size_on_disk_bytes'] / 1e6:.1f} MB")

    merged_source = models.ModelSource(str(merged_dir), None, is_local=True)
    dtype = models.compute_dtype(recipe.model.dtype)
    for variant in recipe.quantize:
        keep = variant.keep_full_precision + _edge_layers(merged_dir, variant.keep_edge_layers)
        model = models.load_model(merged_source, dtype, quantization=variant.kind, keep_unquantized=keep)
        _check_kept_modules_exist(model, keep, variant.label)
        variant_dir = stage_dir / variant.label
        tmp = temp_dir_for(variant_dir)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, variant_dir)
        variants[variant.label] = {**_facts(model, variant_dir), "kind": variant.kind, "kept_unquantized": keep}
        del model
        log(STAGE, f"{variant.label}: {variants[variant.label]['size_on_disk_bytes'] / 1e6:.1f} MB on disk")

    result = {"variants": variants}
    write_json_atomic(stage_dir / "result.json", result)
    mark_done(stage_dir, fingerprint(loaded, run_dir))
    return result


def _edge_layers(model_dir: Path, count: int) -> list[str]:
    """Module prefixes of the first and last `count` transformer blocks (model.layers.0, ...)."""
    if count == 0:
        return []
    import json

    layers = json.loads((model_dir / "config.json").read_text()).get("num_hidden_layers")
    if not layers:
        raise PipelineError(f"quantize.keep_edge_layers: {model_dir}/config.json has no num_hidden_layers")
    indices = sorted(set(range(min(count, layers))) | set(range(max(0, layers - count), layers)))
    return [f"model.layers.{i}" for i in indices]


def _check_kept_modules_exist(model, patterns: list[str], label: str) -> None:
    """A pattern that names no module would silently keep nothing in full precision.

    Matched the way transformers matches its modules-not-to-convert, so the check agrees with what it skipped.
    """
    from transformers.quantizers.quantizers_utils import should_convert_module

    names = [name for name, _ in model.named_modules()]
    for pattern in patterns:
        if all(should_convert_module(name, [pattern]) for name in names):
            raise PipelineError(
                f"quantize ({label}): no module of the model is named {pattern!r}; "
                f"module names look like {names[len(names) // 2]!r}"
            )


def _facts(model, folder: Path) -> dict:
    return {
        "path": folder.name,
        "size_on_disk_bytes": dir_size_bytes(folder),
        "memory_footprint_bytes": model.get_memory_footprint(),
        "parameters": sum(p.numel() for p in model.parameters()),
    }

"""Quantize stage: merge the adapter into the full-precision base, then build each quantized variant.

Writes quantize/merged/ (the specialized model as one plain checkpoint) and quantize/<name>/ per variant
in the recipe: bitsandbytes nf4 / int8 (serialized with save_pretrained), a GGUF file written by llama.cpp's own
converter and quantizer, or the adapter alone as a LoRA GGUF (llama.cpp's convert_lora_to_gguf.py) for a base GGUF
that every run on that base shares (cached once per base and type), each with the tokenizer and an Ollama
Modelfile beside it. Fidelity
is checked where conversions break (pipeline/fidelity.py): the merge against base + adapter, each GGUF
against the merged model, and llama.cpp's tokens against training's. result.json has each variant's
size on disk and in memory, the GGUF tensor types actually written, and the fidelity figures.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import torch

from pipeline import data, fidelity, gguf_export, llamacpp_install, models
from pipeline.errors import PipelineError
from pipeline.files import cache_root, dir_size_bytes, replace_dir, temp_dir_for, write_json_atomic, write_text_atomic
from pipeline.logs import log
from pipeline.processes import cache_lock
from pipeline.recipe import LoadedRecipe, QuantizeVariant, data_fingerprint
from pipeline.run_layout import RunLayout
from pipeline.runs import mark_done, stage_done, stage_fingerprint, start_stage
from pipeline.runtimes import llamacpp, prompts_for

STAGE = "quantize"


def fingerprint(loaded: LoadedRecipe, run_dir: Path) -> str:
    recipe = loaded.recipe
    uses_llamacpp = any(v.is_gguf for v in recipe.quantize)
    return stage_fingerprint(
        STAGE,
        stage_done(run_dir, "train"),
        [v.model_dump() for v in recipe.quantize],
        data_fingerprint(recipe.data),  # the fidelity checks run on eval rows
        recipe.evaluate.max_new_tokens,  # in the Modelfile
        llamacpp_install.VERSION if uses_llamacpp else None,
    )


def run(loaded: LoadedRecipe, run_dir: Path) -> dict:
    from peft import PeftModel

    recipe = loaded.recipe
    adapter_dir = RunLayout(run_dir).adapter
    if stage_done(run_dir, "train") is None or not adapter_dir.is_dir():
        raise PipelineError(
            f"{run_dir}: no finished train stage to quantize; run `make train RECIPE={loaded.path}` first"
        )
    stage_dir = start_stage(RunLayout(run_dir).stage(STAGE))
    tokenizer = models.load_tokenizer(models.ModelSource(str(adapter_dir), None, is_local=True))
    data.apply_chat_template_file(tokenizer, recipe.data)
    chat = data.uses_chat_template(tokenizer, recipe.data.chat_template)
    eval_rows = data.load_rows(recipe.data, "eval")
    sequences, answer_positions = fidelity.sample_sequences(tokenizer, eval_rows, chat)

    # Merge in float32 so the adapter's small deltas are not rounded away, then store in the compute dtype.
    source = models.resolve_model(recipe.model.base)
    base = models.load_model(source, torch.float32, trust_remote_code=recipe.model.trust_remote_code)
    specialized = PeftModel.from_pretrained(base, adapter_dir)
    specialized_logits = fidelity.logits(specialized, sequences)
    merged = specialized.merge_and_unload()
    merged_logits = fidelity.logits(merged, sequences)
    merge_check = fidelity.compare_logits(specialized_logits, merged_logits)
    del specialized_logits
    if merge_check["top1_agreement"] < fidelity.MERGE_MIN_TOP1:
        raise PipelineError(
            f"quantize: the merged model disagrees with base + adapter on {1 - merge_check['top1_agreement']:.1%} of "
            f"the top-1 tokens of {merge_check['rows']} eval rows (max logit difference "
            f"{merge_check['max_abs_logit_diff']:.3g}); the merge changed the model, so nothing was exported"
        )
    merged.to(models.compute_dtype(recipe.model.dtype))
    merged_dir = stage_dir / "merged"
    tmp = temp_dir_for(merged_dir)
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, merged_dir)
    variants = {"merged": {**_facts(merged, merged_dir), "fidelity": {"merge": merge_check}}}
    del base, merged
    log(
        STAGE,
        f"merged: {variants['merged']['size_on_disk_bytes'] / 1e6:.1f} MB; agrees with base + adapter on "
        f"{merge_check['top1_agreement']:.1%} of top-1 tokens "
        f"(max logit difference {merge_check['max_abs_logit_diff']:.2g})",
    )

    merged_source = models.ModelSource(str(merged_dir), None, is_local=True)
    dtype = models.compute_dtype(recipe.model.dtype)
    for variant in (v for v in recipe.quantize if not v.is_gguf):
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

    gguf_variants = [v for v in recipe.quantize if v.is_gguf]
    if gguf_variants:
        prompts = prompts_for(tokenizer, eval_rows, chat)
        context = GgufContext(
            loaded, stage_dir, tokenizer, chat, eval_rows, prompts, sequences, answer_positions, merged_logits
        )
        try:
            for variant in gguf_variants:
                export = _export_gguf_lora if variant.kind == "gguf-lora" else _export_gguf
                variants[variant.label] = export(variant, context, variants["merged"]["parameters"])
        finally:
            context.cleanup()
        _compare_adapters_with_merged_files(variants, context)

    result = {"variants": variants}
    write_json_atomic(RunLayout(run_dir).quantize_result, result)
    mark_done(stage_dir, fingerprint(loaded, run_dir))
    return result


class GgufContext:
    """What every GGUF export of one run shares: the converter, the f16 file, the eval prompts and logits."""

    def __init__(
        self, loaded, stage_dir, tokenizer, chat, eval_rows, prompts, sequences, answer_positions, merged_logits
    ):
        self.recipe = loaded.recipe
        self.stage_dir = stage_dir
        self.tokenizer = tokenizer
        self.chat = chat
        self.eval_rows = eval_rows
        self.prompts = prompts
        self.sequences = sequences
        self.answer_positions = answer_positions
        self.merged_logits = merged_logits
        self.converter = llamacpp_install.ensure()
        self.threads = self.recipe.evaluate.threads or torch.get_num_threads()
        self.gpu = torch.cuda.is_available()
        self.plain_parts = None if chat else gguf_export.plain_prompt_parts(self.recipe.data.prompt)
        self._source_dir: Path | None = None
        self._f16: Path | None = None
        self.top1: dict[str, list[list[int]]] = {}  # per GGUF variant, its top-1 tokens on the sequences

    def source_dir(self) -> Path:
        """The merged model as the converter should see it: its weights and config, and a tokenizer whose chat
        template is the one the specialist was trained with (for a plain-prompt specialist, the plain prompt)."""
        if self._source_dir is None:
            merged = self.stage_dir / "merged"
            view = temp_dir_for(self.stage_dir / "gguf-source")
            view.mkdir()
            for path in merged.iterdir():
                if path.suffix == ".safetensors" or path.name in ("config.json", "generation_config.json"):
                    os.symlink(path.resolve(), view / path.name)
            original = self.tokenizer.chat_template
            if not self.chat:
                self.tokenizer.chat_template = gguf_export.plain_chat_template(self.plain_parts)
            try:
                self.tokenizer.save_pretrained(view)
            finally:
                self.tokenizer.chat_template = original
            # A SentencePiece family's converter reads tokenizer.model (pieces and scores), which a fast tokenizer
            # does not write back: the base model's own, as training used it
            base_dir = models.local_folder(models.resolve_model(self.recipe.model.base))
            if not (view / "tokenizer.model").exists() and (base_dir / "tokenizer.model").is_file():
                os.symlink((base_dir / "tokenizer.model").resolve(), view / "tokenizer.model")
            self._source_dir = view
        return self._source_dir

    def f16_file(self) -> Path:
        """The f16 GGUF that llama.cpp's quantizer starts from, converted once per run of the stage."""
        if self._f16 is None:
            folder = temp_dir_for(self.stage_dir / "gguf-f16")
            folder.mkdir()
            gguf_export.convert(self.converter, self.source_dir(), folder / "model.gguf", "f16", folder / "convert.log")
            self._f16 = folder / "model.gguf"
        return self._f16

    def cleanup(self) -> None:
        """The converter's view and the f16 intermediate are not artifacts: remove them."""
        for path in (self._source_dir, self._f16.parent if self._f16 else None):
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)


def _export_gguf(variant: QuantizeVariant, context: GgufContext, parameters: int) -> dict:
    """Write quantize/<name>/model.gguf with its tokenizer and Modelfile, and check it against the merged model."""
    variant_dir = context.stage_dir / variant.label
    tmp = temp_dir_for(variant_dir)
    tmp.mkdir()
    gguf_file = tmp / "model.gguf"
    if variant.type in gguf_export.CONVERTER_TYPES:
        gguf_export.convert(context.converter, context.source_dir(), gguf_file, variant.type, tmp / "convert.log")
    else:
        gguf_export.quantize(context.f16_file(), gguf_file, variant.type, tmp / "quantize.log", context.threads)
    _write_modelfile(context, tmp, "model.gguf")
    checks = _check_gguf(variant.label, context, gguf_file)
    types = gguf_export.tensor_types(gguf_file)
    replace_dir(tmp, variant_dir)
    size = (variant_dir / "model.gguf").stat().st_size
    _log_export(variant.label, f"{size / 1e6:.1f} MB ({_types_text(types)})", checks)
    return {
        "path": variant.label,
        "kind": "gguf",
        "type": variant.type,
        "file": "model.gguf",
        "size_on_disk_bytes": size,
        "memory_footprint_bytes": size,
        "parameters": parameters,
        "tensor_types": types,
        "fidelity": checks,
    }


def _export_gguf_lora(variant: QuantizeVariant, context: GgufContext, parameters: int) -> dict:
    """Write quantize/<name>/adapter.gguf (the adapter as a LoRA GGUF) for the shared base GGUF of base_type,
    with the tokenizer and a Modelfile (FROM the base, ADAPTER the file), and check base + adapter in llama.cpp
    against the merged model."""
    recipe = context.recipe
    base_file = shared_base_gguf(recipe, variant.base_type, context.converter, context.threads)
    variant_dir = context.stage_dir / variant.label
    tmp = temp_dir_for(variant_dir)
    tmp.mkdir()
    adapter_file = tmp / "adapter.gguf"
    base_dir = models.local_folder(models.resolve_model(recipe.model.base))
    adapter_dir = _adapter_as_llamacpp_reads_it(RunLayout(context.stage_dir.parent).adapter, recipe.lora, tmp)
    converter = llamacpp_install.lora_converter_script()
    gguf_export.convert_lora(converter, adapter_dir, base_dir, adapter_file, variant.adapter_type, tmp / "convert.log")
    if adapter_dir.parent == tmp:
        shutil.rmtree(adapter_dir)
    _write_modelfile(context, tmp, str(base_file), adapter="adapter.gguf")
    checks = _check_gguf(variant.label, context, base_file, adapter_file)
    types = gguf_export.tensor_types(adapter_file)
    # which base the adapter goes on: evaluation, serving and the Modelfile read it from here
    about = {"file": str(base_file), "model": recipe.model.base, "type": variant.base_type}
    write_json_atomic(tmp / "base.json", {**about, "size_on_disk_bytes": base_file.stat().st_size})
    replace_dir(tmp, variant_dir)
    size = (variant_dir / "adapter.gguf").stat().st_size
    base_size = base_file.stat().st_size
    _log_export(variant.label, f"adapter {size / 1e6:.2f} MB on a shared {variant.base_type} base of "
                f"{base_size / 1e6:.1f} MB ({base_file})", checks)  # fmt: skip
    return {
        "path": variant.label,
        "kind": "gguf-lora",
        "type": variant.adapter_type,
        "base_type": variant.base_type,
        "file": "adapter.gguf",
        "base_file": str(base_file),
        "size_on_disk_bytes": size,  # the adapter: what each further specialist on this base adds
        "shared_base_bytes": base_size,
        "memory_footprint_bytes": size + base_size,
        "parameters": parameters,
        "tensor_types": types,
        "base_tensor_types": gguf_export.tensor_types(base_file),
        "fidelity": checks,
    }


def shared_base_gguf(recipe, base_type: str, converter: Path, threads: int) -> Path:
    """The base model as one GGUF of base_type: converted (and quantized) once per base model, type and llama.cpp
    version, in $SPECIALIST_CACHE/gguf-bases/, and shared by every run and every adapter on that base. Under a
    lock, written aside and renamed in: two runs at once convert it once, and a killed one leaves nothing."""
    source = models.resolve_model(recipe.model.base)
    identity = json.dumps([source.fingerprint, base_type, llamacpp_install.VERSION])
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    folder = cache_root() / "gguf-bases" / key
    with cache_lock(f"gguf-base-{key}", f"converting {recipe.model.base} to a {base_type} GGUF"):
        if (folder / "model.gguf").is_file():
            return folder / "model.gguf"
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir_for(folder)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        base_dir = models.local_folder(source)
        log(STAGE, f"converting the base {recipe.model.base} to a {base_type} GGUF once, shared by its adapters")
        if base_type in gguf_export.CONVERTER_TYPES:
            gguf_export.convert(converter, base_dir, tmp / "model.gguf", base_type, tmp / "convert.log")
        else:
            gguf_export.convert(converter, base_dir, tmp / "f16.gguf", "f16", tmp / "convert.log")
            gguf_export.quantize(tmp / "f16.gguf", tmp / "model.gguf", base_type, tmp / "quantize.log", threads)
            (tmp / "f16.gguf").unlink()
        about = {"model": recipe.model.base, "weights": source.fingerprint, "type": base_type}
        write_json_atomic(tmp / "base.json", {**about, "llama_cpp_python": llamacpp_install.VERSION})
        replace_dir(tmp, folder)
    return folder / "model.gguf"


def _adapter_as_llamacpp_reads_it(adapter_dir: Path, lora, tmp: Path) -> Path:
    """The adapter folder for llama.cpp's converter. llama.cpp scales a LoRA by alpha / r; a rank-stabilized
    adapter (alpha / sqrt(r)) is given the alpha that makes the two equal, in a copy of its config."""
    if not lora.rslora:
        return adapter_dir
    view = tmp / "adapter-for-llama.cpp"
    view.mkdir()
    for path in adapter_dir.iterdir():
        if path.is_file() and path.name != "adapter_config.json":
            os.symlink(path.resolve(), view / path.name)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["lora_alpha"] = config["lora_alpha"] * math.sqrt(config["r"])
    config["use_rslora"] = False
    (view / "adapter_config.json").write_text(json.dumps(config))
    return view


def _write_modelfile(context: GgufContext, folder: Path, model: str, adapter: str | None = None) -> None:
    context.tokenizer.save_pretrained(folder)  # the eval prompts are rendered with it, as in training
    template = gguf_export.ollama_template(context.tokenizer, context.chat, context.plain_parts)
    system = _common_system(context.eval_rows) if context.chat else None
    stop = [context.tokenizer.eos_token]
    text = gguf_export.modelfile(model, template, stop, context.recipe.evaluate.max_new_tokens, system, adapter)
    write_text_atomic(folder / "Modelfile", text)


def _check_gguf(label: str, context: GgufContext, gguf_file: Path, lora_file: Path | None = None) -> dict:
    """The file (with lora_file applied) against the merged model on the same tokens, its tokenization of every
    eval prompt against training's, and its end token."""
    facts = llamacpp.call_in_child(
        llamacpp.inspect_gguf,
        str(gguf_file),
        context.sequences,
        [dataclasses.asdict(p) for p in context.prompts],
        context.threads,
        context.gpu,
        str(lora_file) if lora_file else None,
    )
    context.top1[label] = facts["top1"]
    eos = context.tokenizer.eos_token_id
    return {
        "export": fidelity.compare_export(context.merged_logits, context.sequences, context.answer_positions, facts),
        "token_parity": fidelity.token_parity(context.prompts, facts["token_ids"], context.tokenizer),
        "end_token": {"trained": eos, "gguf": facts["eos_token_id"], "same": facts["eos_token_id"] == eos},
    }


def _log_export(label: str, what: str, checks: dict) -> None:
    export, parity, end_token = checks["export"], checks["token_parity"], checks["end_token"]
    log(
        STAGE,
        f"{label}: {what}; top-1 agreement with merged {export['top1_agreement']:.3f} (answers "
        f"{export['answer_top1_agreement'] or 0:.3f}), NLL {export['nll']:.3f} vs {export['nll_merged']:.3f}; "
        f"tokens identical on {parity['identical']}/{parity['prompts']} prompts",
    )
    if not end_token["same"]:
        log(STAGE, f"{label}: WARNING the file's end token is {end_token['gguf']}, training ended with "
            f"{end_token['trained']}")  # fmt: skip


def _types_text(types: dict[str, int]) -> str:
    return ", ".join(f"{n} {t}" for t, n in types.items())


def _compare_adapters_with_merged_files(variants: dict, context: GgufContext) -> None:
    """Each adapter on its base GGUF against the merged GGUF of the same type, where the recipe builds one: the same
    model two ways, so their top-1 tokens should agree as closely as the type's rounding allows."""
    for label, variant in variants.items():
        if variant.get("kind") != "gguf-lora":
            continue
        twin = next(
            (n for n, v in variants.items() if v.get("kind") == "gguf" and v["type"] == variant["base_type"]), None
        )
        if twin is not None:
            found = fidelity.compare_top1(context.top1[label], context.top1[twin], context.answer_positions)
            variant["fidelity"]["versus_merged_gguf"] = {"variant": twin, **found}


def _common_system(rows: list[data.TaskRow]) -> str | None:
    """The system message every eval conversation starts with, if there is one they share."""
    systems = {
        row.messages[0]["content"] if row.messages and row.messages[0]["role"] == "system" else None for row in rows
    }
    return systems.pop() if len(systems) == 1 else None


def _edge_layers(model_dir: Path, count: int) -> list[str]:
    """Module prefixes of the first and last `count` transformer blocks (model.layers.0, ...)."""
    if count == 0:
        return []
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

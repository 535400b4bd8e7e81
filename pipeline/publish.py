"""Publish (`specialist publish`, by hand, not a stage): the adapter with its evidence, to the Hugging Face Hub.

The bundle is built first in runs/<name>/<id>/publish/ -- exactly the files that are uploaded: the
adapter, a model card (README.md) carrying the evaluation against the base and the reference, the
resolved recipe and the report -- then pushed with huggingface_hub (create_repo, create_branch,
upload_folder). A dry run stops after the bundle. The token comes from HF_TOKEN or the user's login
and is handed to huggingface_hub only: no file, log line or message of ours contains it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from pipeline import data, gguf_export, llamacpp_install
from pipeline.errors import PipelineError, RemoteError
from pipeline.files import replace_dir, temp_dir_for, write_json_atomic
from pipeline.logs import log
from pipeline.models import PACKAGED
from pipeline.recipe import LoadedRecipe
from pipeline.render import html
from pipeline.render.markdown import (
    candidates_table,
    cascade_markdown,
    distillation_markdown,
    fidelity_markdown,
    gates_markdown,
    render_markdown,
    verdict,
)
from pipeline.render.model_card import render_body
from pipeline.render.sweep import curve_markdown, sweep_markdown
from pipeline.report_types import has_report, read_report
from pipeline.run_layout import RunLayout
from pipeline.runs import read_manifest, training_invocation
from pipeline.stages.report import failed_gates, page_rows

STAGE = "publish"
EVIDENCE = ("report.md", "report.png", "report.json")
PLOTS = ("sweep", "curve", "cascade")
CARD_TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ body }}\n"


class GatesFailed(PipelineError):
    """The run's gates failed and the user did not ask to publish it anyway."""

    exit_code = 1


@dataclass(frozen=True)
class Bundle:
    folder: Path
    files: dict[str, int]  # path in the repo -> bytes
    card: str


def run(loaded: LoadedRecipe, run_dir: Path, *, dry_run: bool = False, allow_failed_gates: bool = False) -> dict:
    section = publish_section(loaded)
    report = finished_report(loaded, run_dir)
    failed = failed_gates(report)
    if failed and not allow_failed_gates:
        raise GatesFailed(
            f"run {run_dir} failed its gates ({', '.join(failed)}); not publishing it. To publish it anyway, with "
            "the failure stated at the top of its card: ALLOW_FAILED_GATES=1 (specialist publish --allow-failed-gates)"
        )
    bundle = build_bundle(loaded, run_dir, report)
    where = f"{section.repo}@{section.revision} ({'private' if section.private else 'public'})"
    total = sum(bundle.files.values())
    log(STAGE, f"bundle {bundle.folder}: {len(bundle.files)} files, {total / 1e6:.1f} MB")
    for path, size in bundle.files.items():
        log(STAGE, f"  {path} ({size:,} bytes)")
    for line in data_in_bundle(loaded, report):
        log(STAGE, f"data in the bundle: {line.removeprefix('- ')}")
    if dry_run:
        log(STAGE, f"dry run: nothing uploaded; without DRY_RUN these files would go to {where}")
        return {"bundle": str(bundle.folder), "files": bundle.files, "repo": section.repo, "uploaded": False}
    record = upload(bundle, loaded, report)
    write_json_atomic(RunLayout(run_dir).published, record)
    if record["changed"]:
        log(STAGE, f"published to {where}: {record['commit_url']}")
    else:
        log(STAGE, f"{where} already has this bundle; nothing changed (commit {record['commit']})")
    return record


def publish_section(loaded: LoadedRecipe):
    if loaded.recipe.publish is None:
        raise PipelineError(
            f"{loaded.path}: no publish: section; add `publish: {{repo: your-name/{loaded.recipe.name}}}` "
            f"or pass SET=publish.repo=your-name/{loaded.recipe.name}"
        )
    return loaded.recipe.publish


def finished_report(loaded: LoadedRecipe, run_dir: Path) -> dict:
    """The run's report, refusing a run whose evaluation or adapter is missing."""
    report_path = RunLayout(run_dir).report_json
    adapter = RunLayout(run_dir).adapter / "adapter_model.safetensors"
    if not has_report(run_dir) or not RunLayout(run_dir).done_marker("evaluate").is_file() or not adapter.is_file():
        raise PipelineError(
            f"{run_dir}: no finished run of {loaded.path} to publish (adapter and report are missing); "
            f"run `make train RECIPE={loaded.path}` first"
        )
    return read_report(report_path)


# --- the bundle ---------------------------------------------------------------------------------


def build_bundle(loaded: LoadedRecipe, run_dir: Path, report: dict) -> Bundle:
    """Write runs/.../publish/ atomically: the same run always gives the same bytes."""
    section = loaded.recipe.publish
    final = RunLayout(run_dir).publish
    tmp = temp_dir_for(final)
    tmp.mkdir(parents=True)
    base_id = base_model_id(loaded)
    adapter = RunLayout(run_dir).adapter
    for path in sorted(adapter.iterdir()):
        if path.is_file() and path.name != "README.md":  # peft's placeholder card; ours replaces it
            _link_or_copy(path, tmp / path.name)
    if base_id:  # the adapter points at the Hub checkpoint, not at this machine's folder
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base_id
        (tmp / "adapter_config.json").unlink()
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    examples = includes_examples(loaded)
    shown = report if examples else without_examples(report)
    (tmp / "report.json").write_text(public_text(json.dumps(shown, indent=2, sort_keys=False) + "\n"))
    flips = shown.get("flipped_rows", [])
    (tmp / "report.md").write_text(public_text(render_markdown(shown, flips, "report.png")))
    rows = page_rows(loaded, run_dir, shown) if examples else None  # a public page: no row of the data
    (tmp / "report.html").write_text(public_text(html.render(shown, verdict(shown), rows)))
    _link_or_copy(RunLayout(run_dir).plot("report"), tmp / "report.png")
    for plot in PLOTS:  # a sweep's trials, a learning curve, a cascade: where the report has them
        if RunLayout(run_dir).plot(plot).is_file():
            _link_or_copy(RunLayout(run_dir).plot(plot), tmp / f"{plot}.png")
    (tmp / "recipe.resolved.yaml").write_text(public_text(yaml.safe_dump(loaded.resolved, sort_keys=False)))
    if section.merged:
        merged = RunLayout(run_dir).merged
        if not (merged / "config.json").is_file():
            raise PipelineError(f"publish.merged: {merged} has no merged model; rerun `make quantize`")
        (tmp / "merged").mkdir()
        for path in sorted(merged.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                _link_or_copy(path, tmp / "merged" / path.name)
    gguf_files = {}
    for label in gguf_labels(loaded):
        folder = RunLayout(run_dir).variant(label)
        variant = _variant(loaded, label)
        source = folder / ("model.gguf" if variant.kind == "gguf" else "adapter.gguf")
        if not source.is_file():
            raise PipelineError(f"publish.gguf: {label} has no {source.name} in {folder}; rerun `make quantize`")
        file_name = gguf_file_name(loaded, label)
        if not (tmp / file_name).exists():  # one adapter file serves every base type it was scored on
            _link_or_copy(source, tmp / file_name)
        modelfile = (folder / "Modelfile").read_text().replace("FROM ./model.gguf", f"FROM ./{file_name}")
        if variant.kind == "gguf-lora":  # FROM names this machine's cache: the base file the card says to make
            base = base_gguf_name(loaded, variant.base_type)
            origin = f"# the base as a {variant.base_type} GGUF: README.md says how to make it\nFROM ./{base}"
            modelfile = "\n".join(origin if n.startswith("FROM ") else n for n in modelfile.split("\n"))
            modelfile = modelfile.replace("ADAPTER ./adapter.gguf", f"ADAPTER ./{file_name}")
        (tmp / f"Modelfile.{label.removeprefix('gguf-')}").write_text(modelfile)
        gguf_files[label] = file_name
    card = model_card(loaded, run_dir, shown, base_id, gguf_files)
    (tmp / "README.md").write_text(card)
    replace_dir(tmp, final)
    files = {
        path.relative_to(final).as_posix(): path.stat().st_size for path in sorted(final.rglob("*")) if path.is_file()
    }
    return Bundle(final, files, card)


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link costs no disk for the multi-GB files; run artifacts are replaced by rename, never
    rewritten in place, so the bundle's bytes stay the ones it was built from."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def gguf_labels(loaded: LoadedRecipe) -> list[str]:
    section = loaded.recipe.publish
    every = [v.label for v in loaded.recipe.quantize if v.is_gguf]
    if section.gguf is True:
        return every
    return list(section.gguf) if section.gguf else []


def gguf_file_name(loaded: LoadedRecipe, label: str) -> str:
    """<recipe>-<type>.gguf: llama.cpp's `-hf repo:TYPE` and Ollama's hf.co/repo:TYPE find files by type. An
    adapter GGUF is <recipe>-lora-<its own type>.gguf: the same file whatever base type it goes on, and never
    the file a base type's tag finds."""
    variant = _variant(loaded, label)
    if variant.kind == "gguf-lora":
        return f"{loaded.recipe.name}-lora-{variant.adapter_type}.gguf"
    return f"{loaded.recipe.name}-{label.removeprefix('gguf-')}.gguf"


def base_gguf_name(loaded: LoadedRecipe, base_type: str) -> str:
    """The file name the card and Modelfile give the base GGUF an adapter GGUF goes on (the user makes it)."""
    base_id = base_model_id(loaded)
    return f"{base_id.rsplit('/', 1)[-1] if base_id else 'base'}-{base_type}.gguf"


def base_model_id(loaded: LoadedRecipe) -> str | None:
    """The Hub id of the checkpoint the adapter sits on, where there is one."""
    if loaded.recipe.publish.base_model:
        return loaded.recipe.publish.base_model
    base = loaded.recipe.model.base
    if base.startswith("packaged:"):
        return PACKAGED[base.removeprefix("packaged:")].hub_id
    if _is_hub_id(base):
        return base.partition("@")[0]
    return None


def _model_name(ref: str) -> str:
    """How the card names a model reference: its Hub id, never a path on this machine."""
    if ref.startswith("packaged:"):
        return PACKAGED[ref.removeprefix("packaged:")].hub_id
    if _is_hub_id(ref):
        return ref
    return f"a local model ({Path(ref).name})"


def _is_hub_id(ref: str) -> bool:
    return not Path(ref).expanduser().exists() and ref.count("/") == 1 and not ref.startswith((".", "/", "~"))


def includes_examples(loaded: LoadedRecipe) -> bool:
    """publish.include_examples, else: rows of the data go to a private repo, not to a public one."""
    section = loaded.recipe.publish
    return section.private if section.include_examples is None else section.include_examples


def without_examples(report: dict) -> dict:
    """The report without any text of the data's rows: flipped rows and the first token-parity mismatch
    keep their row numbers only."""
    shown = json.loads(json.dumps(report))
    flips = shown.pop("flipped_rows", [])
    shown["flipped_rows_omitted"] = len(flips)
    for check in shown.get("fidelity", {}).values():
        mismatch = check.get("token_parity", {}).get("first_mismatch") if isinstance(check, dict) else None
        if mismatch:
            check["token_parity"]["first_mismatch"] = {"row": mismatch["row"]}
    for cascade in (shown.get("cascade") or {}).get("candidates", {}).values():  # confident wrong answers
        cascade["confident_wrong"] = [
            {"row": w["row"], "confidence": w["confidence"]} for w in cascade["confident_wrong"]
        ]
    for found in (shown.get("answers") or {}).get("candidates", {}).values():  # answers that are not JSON
        if "invalid_json" in found:
            found["invalid_json"]["examples"] = [
                {"row": e["row"], "cut_off": e["cut_off"]} for e in found["invalid_json"]["examples"]
            ]
    labels = shown.get("labels") or {}
    known = set(labels.get("train_rows", {}))
    for found in labels.get("candidates", {}).values():  # a wrong answer outside the label set may quote a row
        known |= set(found["per_label"])
    for found in labels.get("candidates", {}).values():
        for pair in found["confusions"]:
            if pair["answered"] not in known:
                pair["answered"] = "(an answer outside the label set)"
    return shown


def data_in_bundle(loaded: LoadedRecipe, report: dict) -> list[str]:
    """What text from the user's data the bundle holds, file by file (the card lists it; publish prints it)."""
    if not includes_examples(loaded):
        return [
            "No row of the training or evaluation data: publish.include_examples is off "
            f"({'set' if loaded.recipe.publish.include_examples is False else 'the default for a public repo'}). "
            "The recipe's own text is in `recipe.resolved.yaml` (prompt templates, and any label list its "
            "reference prompt names); the report names labels only as the recipe and metrics do."
        ]
    flips = report.get("flipped_rows", [])
    lines = [
        "- `README.md`: the first evaluation row's prompt (How to use).",
        f"- `report.md`, `report.json`: {len(flips)} evaluation rows where the specialist and another candidate "
        "disagree, with their input, expected answer and both answers (Rows that flipped).",
    ]
    if any(
        c.get("token_parity", {}).get("first_mismatch")
        for c in report.get("fidelity", {}).values()
        if isinstance(c, dict)
    ):
        lines.append("- `report.json`: the text of the first prompt llama.cpp tokenized differently (fidelity).")
    if any(
        f.get("invalid_json", {}).get("examples") for f in (report.get("answers") or {}).get("candidates", {}).values()
    ):
        lines.append("- `report.md`, `report.json`: the first answers of each candidate that are not JSON (Answers).")
    return [
        "Text from the data is included (publish.include_examples "
        f"{'on' if loaded.recipe.publish.include_examples else 'default for a private repo'}):",
        *lines,
    ]


def public_text(text: str) -> str:
    """Paths on this machine, as the card and evidence show them: relative to the project, or ~/."""
    for prefix, shown in ((str(Path.cwd()) + "/", ""), (str(Path.home()) + "/", "~/")):
        if len(prefix) > 2:
            text = text.replace(prefix, shown)
    return text


# --- the model card -----------------------------------------------------------------------------


def card_data(loaded: LoadedRecipe, report: dict, base_id: str | None, gguf: bool):
    """The card's metadata: what the Hub indexes, with a model-index entry per candidate and metric."""
    from huggingface_hub import EvalResult, ModelCardData

    section = loaded.recipe.publish
    data = loaded.recipe.data
    dataset = section.dataset
    if dataset is None and data.train and data.train.startswith("hub:"):
        dataset = data.train.removeprefix("hub:")
    eval_source = data.eval or data.train or ""
    if eval_source.startswith("hub:"):
        dataset_type, split = eval_source.removeprefix("hub:"), data.eval_split if data.eval else "held-out"
    else:
        dataset_type, split = Path(eval_source).name, "test" if data.eval else "held-out"
    dataset_name = f"{loaded.recipe.name}: {report['eval_rows']} held-out rows of {dataset_type}"
    results = [
        EvalResult(
            task_type="text-generation",
            task_name=loaded.recipe.name,
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type=metric,
            metric_name=f"{metric} ({candidate})",
            metric_value=values["value"],
        )
        for candidate, c in report["candidates"].items()
        for metric, values in c["metrics"].items()
    ]
    license_id = section.license
    if license_id is None and loaded.recipe.model.base.startswith("packaged:"):
        license_id = PACKAGED[loaded.recipe.model.base.removeprefix("packaged:")].license
    tags = ["specialist", "lora", "peft", "text-generation", *(["gguf"] if gguf else []), *section.tags]
    return ModelCardData(
        base_model=base_id,
        library_name="peft",
        pipeline_tag="text-generation",
        license=license_id,
        tags=list(dict.fromkeys(tags)),
        datasets=[dataset] if dataset else None,
        model_name=section.repo,
        eval_results=results,
    )


def model_card(loaded: LoadedRecipe, run_dir: Path, report: dict, base_id: str | None, gguf_files: dict) -> str:
    from huggingface_hub import ModelCard

    body = _card_body(loaded, run_dir, report, base_id, gguf_files)
    data = card_data(loaded, report, base_id, bool(gguf_files))
    return str(ModelCard.from_template(data, template_str=CARD_TEMPLATE, body=body))


def _card_body(loaded: LoadedRecipe, run_dir: Path, report: dict, base_id: str | None, gguf_files: dict) -> str:
    recipe = loaded.recipe
    metric = report["metric"]
    packaged = (
        PACKAGED[recipe.model.base.removeprefix("packaged:")] if recipe.model.base.startswith("packaged:") else None
    )
    sections = [
        *verdict(report),
        "",
        *_demote(gates_markdown(report)),
        *_demote(fidelity_markdown(report)),
        *_demote(distillation_markdown(report)),
        # how this adapter was chosen (a sweep's trials, on validation rows) and what more rows would buy
        *(_demote(sweep_markdown(report["sweep"])) if report.get("sweep") else []),
        *(_demote(curve_markdown(report["learning_curve"])) if report.get("learning_curve") else []),
        *_demote(cascade_markdown(report)),  # the operating point: threshold, share answered locally, metric
    ]
    return render_body(
        {
            "failed_gates": failed_gates(report),
            "title": recipe.publish.repo.split("/")[1],
            "base_name": base_id or _model_name(recipe.model.base),
            "recipe_name": recipe.name,
            "eval_rows": report["eval_rows"],
            "metric": metric,
            "score": report["candidates"]["specialized"]["metrics"][metric],
            "versus": _summary_versus(report),
            "packaged": packaged,
            "candidates": _candidates_list(loaded, report),
            "table": "\n".join(candidates_table(report)),
            "sections": "\n".join(sections),
            **_usage(loaded, run_dir, gguf_files),
            "training": _training(loaded, run_dir, report),
            "resolved_yaml": public_text(yaml.safe_dump(loaded.resolved, sort_keys=False)).rstrip(),
            "merged": recipe.publish.merged,
            "files": [_file_entry(loaded, label, name) for label, name in gguf_files.items()],
            "data_in_bundle": "\n".join(data_in_bundle(loaded, report)),
            "run_id": report["run_id"],
        }
    )


def _file_entry(loaded: LoadedRecipe, label: str, file_name: str) -> dict:
    variant = _variant(loaded, label)
    entry = {"name": file_name, "label": label, "type": label.removeprefix("gguf-"), "adapter": False}
    if variant.kind == "gguf-lora":
        entry.update(adapter=True, adapter_type=variant.adapter_type, base_type=variant.base_type)
    return entry


def _summary_versus(report: dict) -> str:
    metric = report["metric"]
    c = report["candidates"]
    parts = []
    if "base" in c:
        parts.append(f"{c['base']['metrics'][metric]['value']:.3f} for its general base")
    if "reference" in c:
        ref, spec = c["reference"], c["specialized"]
        text = f"{ref['metrics'][metric]['value']:.3f} for the reference"
        if spec["seconds_per_example_p50"] and ref["seconds_per_example_p50"]:
            speed = ref["seconds_per_example_p50"] / spec["seconds_per_example_p50"]
            text += f", which it answers {speed:.1f}x as fast"
        parts.append(text)
    return f", against {' and '.join(parts)}" if parts else ""


def _candidates_list(loaded: LoadedRecipe, report: dict) -> list[tuple[str, str]]:
    """Each candidate and what model it is."""
    recipe = loaded.recipe
    lines = []
    for name, c in report["candidates"].items():
        if c["role"] == "base":
            what = f"{_model_name(recipe.model.base)} as it is, same prompt"
        elif c["role"] == "specialized":
            what = "base + this adapter"
        elif c["role"] == "reference" and recipe.evaluate.reference.endpoint is not None:
            reference = recipe.evaluate.reference
            host = urlsplit(reference.endpoint.base_url).hostname
            where = "a local server" if host in ("127.0.0.1", "localhost", "::1") else host
            what = f"{reference.model} through an OpenAI-compatible API ({where}), the large general model"
            what += ", given its own prompt"
        elif c["role"] == "reference":
            what = f"{_model_name(recipe.evaluate.reference.model)}, the large general model, given its own prompt"
        elif any(v.label == name and v.kind == "gguf-lora" for v in recipe.quantize):
            variant = _variant(loaded, name)
            what = f"this adapter as a LoRA GGUF ({variant.adapter_type}) on the base as a {variant.base_type} GGUF"
            what += " (llama.cpp)"
        else:
            what = f"the merged specialist quantized ({c.get('runtime', 'transformers')})"
        lines.append((name, what))
    return lines


def _demote(lines: list[str]) -> list[str]:
    """The report's sections, one heading level down inside the card's Evaluation."""
    return [f"#{line}" if line.startswith("## ") else line for line in lines]


def _usage(loaded: LoadedRecipe, run_dir: Path, gguf_files: dict) -> dict:
    """What How to use shows: the prompt as the model saw it, and the first merged and adapter GGUF files."""
    examples = includes_examples(loaded)
    prompt, add_special = example_prompt(loaded, run_dir, placeholders=not examples)
    merged = [(k, v) for k, v in gguf_files.items() if _variant(loaded, k).kind == "gguf"]
    adapters = [(k, v) for k, v in gguf_files.items() if _variant(loaded, k).kind == "gguf-lora"]
    return {
        "repo": loaded.recipe.publish.repo,
        "examples": examples,
        "prompt": prompt,
        "prompt_literal": repr(prompt),
        "add_special": add_special,
        "max_new_tokens": loaded.recipe.evaluate.max_new_tokens,
        "merged_gguf": (
            {"tag": merged[0][0].removeprefix("gguf-").upper(), "type": merged[0][0].removeprefix("gguf-")}
            if merged
            else None
        ),
        "adapter_gguf": _adapter_gguf_usage(loaded, *adapters[0]) if adapters else None,
    }


def _adapter_gguf_usage(loaded: LoadedRecipe, label: str, file_name: str) -> dict:
    """How to run the adapter GGUF: make the base GGUF it was scored on once, then load the adapter on it."""
    variant = _variant(loaded, label)
    base_file = base_gguf_name(loaded, variant.base_type)
    if variant.base_type in gguf_export.CONVERTER_TYPES:
        convert = [f"python convert_hf_to_gguf.py base --outtype {variant.base_type} --outfile {base_file}"]
    else:
        convert = [
            "python convert_hf_to_gguf.py base --outtype f16 --outfile base-f16.gguf",
            f"llama-quantize base-f16.gguf {base_file} {variant.base_type.upper()}",
        ]
    return {
        "label": label,
        "type": label.removeprefix("gguf-"),
        "base_id": base_model_id(loaded) or "<the base checkpoint>",
        "base_type": variant.base_type,
        "base_file": base_file,
        "file_name": file_name,
        "convert": convert,
        "llamacpp_version": llamacpp_install.VERSION,
    }


def _variant(loaded: LoadedRecipe, label: str):
    return next(v for v in loaded.recipe.quantize if v.label == label)


def example_prompt(loaded: LoadedRecipe, run_dir: Path, placeholders: bool = False) -> tuple[str, bool]:
    """The first eval row's prompt as the model saw it, and whether the tokenizer adds BOS to it; with
    placeholders, the same row with each field the prompt uses shown as <field> instead of its text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(RunLayout(run_dir).adapter))
    row = data.load_splits(loaded.recipe.data).eval[0]
    if placeholders:
        row = data.placeholder_row(loaded.recipe.data, row)
    chat = data.uses_chat_template(tokenizer, loaded.recipe.data.chat_template)
    return data.prompt_text(tokenizer, row, chat)


def _training(loaded: LoadedRecipe, run_dir: Path, report: dict) -> list[tuple[str, object]]:
    """The Training table's rows: what was trained, on what, how, and where."""
    recipe = loaded.recipe
    train = _read_json(RunLayout(run_dir).train_result)
    manifest = read_manifest(run_dir)
    trained_by = training_invocation(manifest)
    lora = recipe.lora
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules)
    refit = train.get("refit") or {}
    rows = [
        ("base model", _model_name(recipe.model.base)),
        ("training rows", train.get("rows")),
        ("evaluation rows", report["eval_rows"]),
        ("data fingerprint", f"`{manifest.get('data_fingerprint', '?')[:16]}`"),
        ("LoRA", f"r={lora.r}, alpha={lora.alpha:g}, dropout={lora.dropout:g}, on {targets}"),
        ("QLoRA (4-bit base)", "yes" if recipe.train.qlora else "no"),
        ("epochs / steps", f"{recipe.train.epochs:g} / {train.get('steps')}"),
        ("batch size x accumulation", f"{recipe.train.batch_size} x {recipe.train.grad_accum}"),
        ("learning rate", f"{recipe.train.lr:g}"),
        ("seed", recipe.train.seed),
        ("final training loss", f"{train['final_loss']:.4f}" if train.get("final_loss") is not None else None),
        ("adapter kept", train.get("validation", {}).get("why")),
        # train.refit: the adapter published is the second training's, on the validation rows too
        ("refit (the adapter published)", refit.get("why")),
        ("training time", f"{train['train_seconds']:.0f} s" if train.get("train_seconds") else None),
        ("refit time", f"{refit['train_seconds']:.0f} s" if refit.get("train_seconds") else None),
        ("trained on", _machine(trained_by.get("machine", {}))),
        ("trained at", trained_by.get("started_at")),
        (
            "versions",
            ", ".join(f"{k} {v}" for k, v in trained_by.get("versions", {}).items() if v),
        ),
        ("pipeline commit", f"`{trained_by['git_commit'][:12]}`" if trained_by.get("git_commit") else None),
        ("run id", f"`{report['run_id']}`"),
    ]
    return [(name, value) for name, value in rows if value is not None]


def _machine(machine: dict) -> str | None:
    if not machine:
        return None
    if machine.get("gpu"):
        return f"{machine.get('gpu_count', 1)} x {machine['gpu']}"
    return f"CPU, {machine.get('cpu_count')} cores"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


# --- upload -------------------------------------------------------------------------------------


def upload(bundle: Bundle, loaded: LoadedRecipe, report: dict) -> dict:
    """Push the bundle: create the repo and branch where needed, then one commit of what changed."""
    from huggingface_hub import HfApi, get_token

    section = loaded.recipe.publish
    token = get_token()
    if not token:
        raise PipelineError(
            "publish: no Hugging Face token; set HF_TOKEN to a write token (https://huggingface.co/settings/tokens) "
            f"or run `hf auth login`. The bundle is ready in {bundle.folder}"
        )
    for path in bundle.folder.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000 and token.encode() in path.read_bytes():
            raise PipelineError(
                f"publish: {path.relative_to(bundle.folder)} contains your Hugging Face token; "
                "remove it from the recipe or data before publishing"
            )
    endpoint = os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint, token=token)
    repo, revision = section.repo, section.revision
    with _hub_errors("checking the token", token, bundle, api.endpoint, repo):
        me = api.whoami()
    _check_namespace(me, repo, bundle)
    with _hub_errors(f"creating {repo}", token, bundle, api.endpoint, repo):
        api.create_repo(repo, private=section.private, exist_ok=True)
        if revision != "main":
            api.create_branch(repo, branch=revision, exist_ok=True)
        before = _head(api, repo, revision)
    message = f"specialist: publish run {report['run_id']} of recipe {loaded.recipe.name}"
    metric = report["metric"]
    spec = report["candidates"]["specialized"]["metrics"][metric]["value"]
    description = (
        f"{metric} {spec:.3f} on {report['eval_rows']} held-out rows; gates "
        f"{'passed' if report['gates']['passed'] else 'FAILED: ' + ', '.join(failed_gates(report))}."
    )
    with _hub_errors(f"uploading to {repo}@{revision}", token, bundle, api.endpoint, repo):
        info = api.upload_folder(
            repo_id=repo,
            folder_path=bundle.folder,
            revision=revision,
            commit_message=message,
            commit_description=description,
        )
    return {
        "repo": repo,
        "revision": revision,
        "private": section.private,
        "commit": info.oid,
        "commit_url": info.commit_url,
        "changed": info.oid != before,
        "run_id": report["run_id"],
        "files": bundle.files,
    }


def _head(api, repo: str, revision: str) -> str | None:
    from huggingface_hub.errors import RevisionNotFoundError

    try:
        return api.repo_info(repo, revision=revision).sha
    except RevisionNotFoundError:
        return None


def _check_namespace(me: dict, repo: str, bundle: Bundle) -> None:
    """Fail before writing anything when the token cannot publish there at all."""
    user = me.get("name", "?")
    namespaces = {user, *(org.get("name") for org in me.get("orgs", []))}
    owner = repo.split("/")[0]
    if owner not in namespaces:
        raise PipelineError(
            f"publish.repo: {repo} is under '{owner}', which this token's user ('{user}') cannot publish to "
            f"(yours: {', '.join(sorted(n for n in namespaces if n))}); use one of those as the owner. "
            f"The bundle is kept in {bundle.folder}"
        )
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise PipelineError(
            "publish: the Hugging Face token is read-only; create a write token and set HF_TOKEN. "
            f"The bundle is kept in {bundle.folder}"
        )


@contextlib.contextmanager
def _hub_errors(action: str, token: str, bundle: Bundle, endpoint: str, repo: str):
    """The Hub's failures as messages a user can act on; the token scrubbed from anything shown."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    kept = f"The bundle is kept in {bundle.folder}; rerun `make publish` to retry."
    try:
        yield
    except OfflineModeIsEnabled:
        raise RemoteError(f"publish: HF_HUB_OFFLINE is set; unset it to publish. {kept}") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        detail = _scrub(e.server_message or str(e).splitlines()[0], token)
        if status == 401:
            message = f"publish: the Hub rejected the token (401) while {action}; check HF_TOKEN or `hf auth login`"
            raise PipelineError(f"{message}. {kept}") from None
        if status in (403, 404):
            raise PipelineError(
                f"publish.repo: {repo}: not allowed ({status}) while {action}: {detail}. The repository may belong "
                f"to someone else, or the token may lack write access to it. {kept}"
            ) from None
        if status is not None and 400 <= status < 500:
            raise PipelineError(f"publish: the Hub refused {action} ({status}): {detail}. {kept}") from None
        raise RemoteError(f"publish: the Hub failed while {action} ({status}): {detail}. {kept}") from None
    except (httpx2.HTTPError, OSError) as e:
        raise RemoteError(
            f"publish: could not reach {endpoint} while {action} ({type(e).__name__}: {_scrub(str(e), token)}). {kept}"
        ) from None


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "<token>") if token else text

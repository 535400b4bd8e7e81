"""Every path in a run folder, named once. Stages, commands and servers ask this for a path instead of spelling it,
and each stage writes only under its own folder:

    runs/<recipe name>/<run id>/
      recipe.resolved.yaml   manifest.json   .lock   logs/ (crash logs)   data/ (tokenized rows, cached)
      sweep.json  curve.json  (written by the sweep that chose this run, read by its report)
      validation/ curve-eval/ (a sweep's scoring of this run's adapter)   published.json (what publish pushed)
      synthesize/ rows.jsonl, candidates.jsonl, result.json (the rows the teacher wrote, their checks, what was kept)
      distill/    labelled.jsonl, result.json (the teacher's answers and what was kept)
      train/      adapter/ (the kept adapter), result.json, metrics.jsonl, checkpoints/, tensorboard/, tracking.json
                  (train.refit: validated-adapter/, validated.json, refit-metrics.jsonl, refit-checkpoints/)
      quantize/   merged/, one folder per variant, result.json
      evaluate/   generations/<candidate>.jsonl, results.json, eval_rows.jsonl (the rows it evaluated)
      cascade/    result.json
      report/     report.json, report.md, report.html, report.png (+ sweep.png, curve.png, cascade.png)
      publish/    the Hub bundle   (slurm/ and sky/: a scheduler's job files)
      suggest/    suggestions.jsonl (`specialist suggest`: the inputs most worth labelling next), generations/

Every stage folder holds a done marker (.done.json) with the fingerprint of what it was made from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DONE_MARKER = ".done.json"
STAGES = ("synthesize", "distill", "train", "quantize", "evaluate", "cascade", "report")  # a run's stages in order
SWEEP_FILE, CURVE_FILE = "sweep.json", "curve.json"  # in a run folder, and in a sweep's or curve's summary folder


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def stage(self, name: str) -> Path:
        """A stage's folder: the only one that stage writes."""
        return self.root / name

    def done_marker(self, stage: str) -> Path:
        """The fingerprint of what the stage was made from; absent while it runs or after a kill."""
        return self.root / stage / DONE_MARKER

    # --- the run's own files
    @property
    def resolved_recipe(self) -> Path:
        """The recipe as this run read it (extends and --set applied)."""
        return self.root / "recipe.resolved.yaml"

    @property
    def manifest(self) -> Path:
        """One entry per invocation: versions, commit, machine, stages run."""
        return self.root / "manifest.json"

    @property
    def lock(self) -> Path:
        """Held while a process works on the run (flock: dies with it)."""
        return self.root / ".lock"

    @property
    def logs(self) -> Path:
        """Crash logs, with their traceback and no secret."""
        return self.root / "logs"

    @property
    def data_cache(self) -> Path:
        """Tokenized training rows, cached under the data fingerprint."""
        return self.root / "data"

    @property
    def sweep(self) -> Path:
        """The sweep that chose this run (its report shows the trials)."""
        return self.root / SWEEP_FILE

    @property
    def curve(self) -> Path:
        """The learning curve drawn from this run."""
        return self.root / CURVE_FILE

    @property
    def sweep_validation(self) -> Path:
        """A sweep trial's chosen adapter scored on the validation rows (the sweep's own folder in the trial's run)."""
        return self.root / "validation"

    @property
    def curve_eval(self) -> Path:
        """A learning-curve share's adapter on the eval rows."""
        return self.root / "curve-eval"

    @property
    def published(self) -> Path:
        """What was pushed to the Hub where, and when: beside the bundle, not in it."""
        return self.root / "published.json"

    # --- distill/
    # --- synthesize/
    @property
    def synthesized_rows(self) -> Path:
        """The teacher's new rows that passed the checks, in the data's columns: the train stage reads them."""
        return self.root / "synthesize" / "rows.jsonl"

    @property
    def synthesize_candidates(self) -> Path:
        """Every row the teacher wrote, what it was asked with and its verdict (kept, or why dropped)."""
        return self.root / "synthesize" / "candidates.jsonl"

    @property
    def synthesize_result(self) -> Path:
        """The teacher's score, rows asked, kept and dropped by reason, diversity, what it cost."""
        return self.root / "synthesize" / "result.json"

    @property
    def distill_result(self) -> Path:
        """The teacher, rows labelled and dropped, what it cost."""
        return self.root / "distill" / "result.json"

    @property
    def labelled_rows(self) -> Path:
        """The teacher's answers (append-only: a killed labelling continues)."""
        return self.root / "distill" / "labelled.jsonl"

    # --- train/
    @property
    def adapter(self) -> Path:
        """The kept adapter and its tokenizer (peft format)."""
        return self.root / "train" / "adapter"

    @property
    def train_result(self) -> Path:
        """Steps, losses, rows, precision, the validation curve and the chosen step."""
        return self.root / "train" / "result.json"

    @property
    def train_metrics(self) -> Path:
        """Loss, learning rate, grad norm and validation passes per step."""
        return self.root / "train" / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        """For resuming; removed once training finishes."""
        return self.root / "train" / "checkpoints"

    @property
    def validated_adapter(self) -> Path:
        """train.refit: the adapter chosen on the validation rows, before the refit (the before-refit candidate)."""
        return self.root / "train" / "validated-adapter"

    @property
    def validated_result(self) -> Path:
        """train.refit: the first pass's result, so a refit killed part-way does not train that pass again."""
        return self.root / "train" / "validated.json"

    @property
    def refit_metrics(self) -> Path:
        """train.refit: loss per step of the refit on the training and validation rows."""
        return self.root / "train" / "refit-metrics.jsonl"

    @property
    def refit_checkpoints(self) -> Path:
        """train.refit: for resuming the refit; removed once it finishes."""
        return self.root / "train" / "refit-checkpoints"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard's event files (train.report_to)."""
        return self.root / "train" / "tensorboard"

    @property
    def tracking(self) -> Path:
        """Where each tracker's run is."""
        return self.root / "train" / "tracking.json"

    # --- quantize/
    def variant(self, label: str) -> Path:
        """One quantized variant: its model files, Modelfile, tokenizer."""
        return self.root / "quantize" / label

    @property
    def merged(self) -> Path:
        """The adapter merged into the base (safetensors)."""
        return self.root / "quantize" / "merged"

    @property
    def quantize_result(self) -> Path:
        """Size on disk and in memory per variant, GGUF tensor types, fidelity checks."""
        return self.root / "quantize" / "result.json"

    # --- evaluate/
    def generations(self, candidate: str) -> Path:
        """Every answer of one candidate (the cache), beside its cost facts."""
        return self.root / "evaluate" / "generations" / f"{candidate}.jsonl"

    @property
    def eval_results(self) -> Path:
        """Per candidate: metrics with per-row scores, costs."""
        return self.root / "evaluate" / "results.json"

    @property
    def eval_rows(self) -> Path:
        """The rows evaluated, as they were (compare pairs on these)."""
        return self.root / "evaluate" / "eval_rows.jsonl"

    # --- cascade/
    @property
    def suggest(self) -> Path:
        """`specialist suggest`: the specialist's answers to the inputs (cached) and suggestions.jsonl."""
        return self.root / "suggest"

    @property
    def cascade_result(self) -> Path:
        """The threshold chosen on validation rows and the cascade on the eval rows."""
        return self.root / "cascade" / "result.json"

    # --- report/
    @property
    def report_json(self) -> Path:
        """The report as data (docs: report.json)."""
        return self.root / "report" / "report.json"

    @property
    def report_md(self) -> Path:
        """The report to read."""
        return self.root / "report" / "report.md"

    @property
    def report_html(self) -> Path:
        """The report as one self-contained page."""
        return self.root / "report" / "report.html"

    @property
    def legacy_report_json(self) -> Path:
        """Where the report lay before report.json schema 6 (evaluate/): read only to say `make report` moves it."""
        return self.root / "evaluate" / "report.json"

    def plot(self, name: str) -> Path:
        """report/<name>.png: report, cascade, sweep, curve."""
        return self.root / "report" / f"{name}.png"

    # --- publish/, schedulers
    @property
    def publish(self) -> Path:
        """The Hub bundle `make publish` uploads."""
        return self.root / "publish"

    @property
    def slurm(self) -> Path:
        """Sbatch scripts and job logs."""
        return self.root / "slurm"

    @property
    def sky(self) -> Path:
        """SkyPilot task files."""
        return self.root / "sky"

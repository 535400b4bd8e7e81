"""The stages of a run, one module each, in the order pipeline/run_layout.py's STAGES gives, and the contract each
keeps (pipeline/runner.py runs them through it):

- `STAGE`: its name, which is also the one folder of the run it writes (`RunLayout(run_dir).stage(STAGE)`);
- `fingerprint(loaded, run_dir)`: a hash of everything its output depends on (its recipe sections, the upstream
  stages' fingerprints), or None where the recipe has no such stage; the runner skips a stage whose done marker
  holds this fingerprint;
- `run(loaded, run_dir)`: the work, writing only under its own folder (`start_stage` first, so a killed run is
  redone, `mark_done` last), reading other stages' outputs only through RunLayout; it returns its result (the
  report stage: the report).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # annotations only: the stages import the recipe, never the other way round
    from pipeline.recipe import LoadedRecipe


class Stage(Protocol):
    STAGE: str

    def fingerprint(self, loaded: LoadedRecipe, run_dir: Path) -> str | None: ...

    def run(self, loaded: LoadedRecipe, run_dir: Path) -> dict: ...

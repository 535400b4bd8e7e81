"""One round of labelling on the demo task, with train.jsonl's gold labels standing in for the person.

    python data/intents/label_round.py RECIPE SUGGESTIONS OUT_DIR

Writes OUT_DIR/suggested.jsonl (the recipe's training rows, i.e. the seeds, plus the suggested inputs with their
gold labels) and OUT_DIR/random.jsonl (the seeds plus as many inputs drawn at random, seeded, from the same pool:
train.jsonl less the seeds), so a run on each measures what `specialist suggest` bought against random rows.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from pipeline import data
from pipeline.recipe import load_recipe

HERE = Path(__file__).resolve().parent


def main(recipe: str, suggestions: str, out_dir: str) -> None:
    loaded = load_recipe(recipe, ["synthesize=null"])
    splits = data.load_splits(loaded.recipe.data)
    gold = {row["text"]: row for _, row in data.read_jsonl(HERE / "train.jsonl")}
    seeds = [gold[_text(row.prompt)] for row in splits.train]
    suggested = [gold[row["text"]] for _, row in data.read_jsonl(Path(suggestions))]
    taken = {row["text"] for row in seeds}
    pool = [row for text, row in gold.items() if text not in taken]
    drawn = random.Random(0).sample(pool, len(suggested))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("suggested", seeds + suggested), ("random", seeds + drawn)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"{out / name}.jsonl: {len(seeds)} seed rows + {len(rows) - len(seeds)} {name}")


def _text(prompt: str) -> str:
    """The message inside the demo's prompt ("...Message: {text}\\nIntent:")."""
    return prompt.split("Message: ", 1)[1].rsplit("\nIntent:", 1)[0]


if __name__ == "__main__":
    main(*sys.argv[1:])

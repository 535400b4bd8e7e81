"""`specialist inspect`: show exactly what the model will learn from.

Prints a few training rows as the model sees them, with the trained tokens (the ones that carry the
loss) marked apart from the masked ones, and the token-length statistics of the training set.
"""

from __future__ import annotations

import statistics
import sys

from pipeline import data, models
from pipeline.errors import PipelineError
from pipeline.recipe import LoadedRecipe

TRAINED_START, TRAINED_END = "[[", "]]"
ANSI_TRAINED, ANSI_RESET = "\033[1;32m", "\033[0m"


def marked_text(tokenizer, example: dict[str, list[int]], color: bool = False) -> str:
    """The example's text, with each run of trained tokens wrapped in [[ ]] (or shown in green)."""
    start, end = (ANSI_TRAINED, ANSI_RESET) if color else (TRAINED_START, TRAINED_END)
    pieces, run, run_trained = [], [], None
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        trained = label != data.IGNORE_INDEX
        if run and trained != run_trained:
            pieces.append(_piece(tokenizer, run, run_trained, start, end))
            run = []
        run.append(token)
        run_trained = trained
    if run:
        pieces.append(_piece(tokenizer, run, run_trained, start, end))
    return "".join(pieces)


def _piece(tokenizer, ids: list[int], trained: bool, start: str, end: str) -> str:
    text = tokenizer.decode(ids)
    return f"{start}{text}{end}" if trained else text


def run(loaded: LoadedRecipe, rows: int = 3, distilled=None) -> dict:
    """distilled: the distill stage's labelled rows (a run's distill/labelled.jsonl), shown after the gold rows."""
    recipe = loaded.recipe
    source = models.resolve_model(recipe.model.base)
    tokenizer = models.load_tokenizer(source, recipe.model.trust_remote_code)
    data.apply_chat_template_file(tokenizer, recipe.data)
    chat = data.uses_chat_template(tokenizer, recipe.data.chat_template)
    if recipe.distill and distilled is None:
        print("distill: no labelled rows yet (run the distill stage); showing the gold rows only\n", file=sys.stderr)
    splits = data.load_splits(recipe.data, distilled=distilled)
    if not splits.train:
        raise PipelineError(f"{loaded.path}: no training rows to show yet; run the distill stage first")
    tokenized = data.training_examples(tokenizer, splits.train, chat, recipe.data)
    color = sys.stdout.isatty()
    legend = "trained tokens in green" if color else f"trained tokens between {TRAINED_START} and {TRAINED_END}"
    print(f"{len(splits.train)} training rows, {len(splits.eval)} eval rows; {legend}\n")
    for row, example in list(zip(splits.train, tokenized.examples, strict=False))[:rows]:
        print(f"--- {row.source} ({len(example['input_ids'])} tokens)")
        print(marked_text(tokenizer, example, color))
        print()
    lengths = sorted(tokenized.lengths)
    stats = {
        "min": lengths[0],
        "median": statistics.median(lengths),
        "p95": lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))],
        "max": lengths[-1],
        "over_max_seq_len": sum(n > recipe.data.max_seq_len for n in lengths),
        "dropped": tokenized.dropped,
        "truncated": tokenized.truncated,
        "duplicates_in_train": splits.duplicates_in_train,
        "eval_overlap_exact": splits.overlap_exact,
        "eval_overlap_normalized": splits.overlap_normalized,
    }
    print("tokens per training row: " + ", ".join(f"{k} {stats[k]}" for k in ("min", "median", "p95", "max")))
    print(
        f"over data.max_seq_len ({recipe.data.max_seq_len}): {stats['over_max_seq_len']} "
        f"({stats['dropped']} dropped, {stats['truncated']} truncated)"
    )
    print(
        f"duplicates in train: {stats['duplicates_in_train']}; eval prompts also in train: "
        f"{stats['eval_overlap_exact']} verbatim, {stats['eval_overlap_normalized']} after normalizing"
    )
    return stats

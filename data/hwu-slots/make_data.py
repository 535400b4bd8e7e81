"""Build train.jsonl / test.jsonl for slot filling from HWU64 (Liu et al., IWSDS 2019), CC BY 4.0.

Source: https://github.com/xliuhw/NLU-Evaluation-Data at commit f6071b496b17d71e6eb43f543af0707f4ff30557,
cross-validation fold 1, the same files as ../hwu-scenarios/make_data.py (whose reading helpers this script
uses): the fold's training file (Rasa JSON, entities with their values) and its test files (one CSV per
intent, slots annotated inline as `[time : nine am]`). Each row is {"text", "parse"} where parse is the
JSON object a specialist should answer: {"intent": "<scenario>_<intent>", "slots": {"<slot>": "<value>"}}, the
slots in the order they appear, a slot named twice holding a list of its values, and no slots as {}. A seeded
sample stratified by intent (64 intents): 1,000 training rows and 200 test rows; training rows whose text is
also a test row's are left out.

    python data/hwu-slots/make_data.py /path/to/NLU-Evaluation-Data (a clone, or a bare git directory)
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import random
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("hwu_scenarios", HERE.parent / "hwu-scenarios" / "make_data.py")
hwu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hwu)

SIZES = {"train": 1000, "test": 200}
SEED = 0
ANNOTATED = re.compile(r"\[\s*([^:\]]+?)\s*:\s*([^\]]*?)\s*\]")


def parse(intent: str, slots: list[tuple[str, str]]) -> dict:
    found: dict = {}
    for name, value in slots:
        if name in found:
            found[name] = [*found[name], value] if isinstance(found[name], list) else [found[name], value]
        else:
            found[name] = value
    return {"intent": intent, "slots": found}


def main(repo: Path) -> None:
    rng = random.Random(SEED)
    examples = json.loads(hwu.show(repo, hwu.TRAIN))["rasa_nlu_data"]["common_examples"]
    train = []
    for e in examples:
        text = e["text"].strip()
        if text:
            slots = [(s["entity"], s["value"].strip()) for s in sorted(e.get("entities", []), key=lambda s: s["start"])]
            train.append({"text": text, "parse": parse(e["intent"], slots), "label": e["intent"]})
    listing = subprocess.run(
        ["git", f"--git-dir={hwu._git_dir(repo)}", "ls-tree", "--name-only", f"{hwu.COMMIT}:{hwu.FOLD}/testset/csv/"],
        check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    test = []
    for name in sorted(listing):
        for row in csv.DictReader(io.StringIO(hwu.show(repo, f"{hwu.FOLD}/testset/csv/{name}")), delimiter=";"):
            text = row["answer_from_anno"].strip()
            if text:
                slots = ANNOTATED.findall(row["answer_annotation"])
                intent = f"{row['scenario']}_{row['intent']}"
                test.append({"text": text, "parse": parse(intent, slots), "label": intent})
    seen = {r["text"].lower() for r in test}
    train = [r for r in train if r["text"].lower() not in seen]  # no test phrasing among the training rows
    for split, rows in (("train", train), ("test", test)):
        sample = hwu.stratified(rows, SIZES[split], rng)  # by intent (the label it stratifies on)
        lines = [json.dumps({"text": r["text"], "parse": r["parse"]}) + "\n" for r in sample]
        (HERE / f"{split}.jsonl").write_text("".join(lines))
        with_slots = sum(bool(r["parse"]["slots"]) for r in sample)
        intents = len({r["label"] for r in sample})
        print(f"{split}: {len(sample)} rows of {len(rows)}, {intents} intents, {with_slots} with slots")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

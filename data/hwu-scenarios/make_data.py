"""Build train.jsonl / test.jsonl from HWU64 (Liu et al., IWSDS 2019), CC BY 4.0.

Source: https://github.com/xliuhw/NLU-Evaluation-Data at commit f6071b496b17d71e6eb43f543af0707f4ff30557,
cross-validation fold 1: its training file (Rasa JSON) and its test files (one CSV per intent). The label
is the request's scenario (18 domains: alarm, audio, calendar, ..., weather), the part of the intent
before the first underscore. A seeded sample stratified by scenario: about 1,200 training rows from the
fold's training rows and 400 from its test rows (1,199 and 398 after rounding each scenario's share); texts
as the dataset normalised them.

    python data/hwu-scenarios/make_data.py /path/to/NLU-Evaluation-Data (a clone, or a bare git directory)
"""

from __future__ import annotations

import csv
import io
import json
import random
import subprocess
import sys
from pathlib import Path

COMMIT = "f6071b496b17d71e6eb43f543af0707f4ff30557"
FOLD = "CrossValidation/autoGeneFromRealAnno/autoGene_2018_03_22-13_01_25_169/CrossValidation/KFold_1"
TRAIN = (
    "CrossValidation/out4RasaReal/rasa_json_2018_03_22-13_01_25_169_80Train/CrossValidation/KFold_1/merged/"
    "RasaNlu_Merged_KFold_1_2018_03_22-13_01_25_169.json"
)
SIZES = {"train": 1200, "test": 400}
SEED = 0


def show(repo: Path, path: str) -> str:
    return subprocess.run(
        ["git", f"--git-dir={_git_dir(repo)}", "show", f"{COMMIT}:{path}"], check=True, capture_output=True, text=True
    ).stdout


def _git_dir(repo: Path) -> Path:
    return repo / ".git" if (repo / ".git").exists() else repo


def stratified(rows: list[dict], n: int, rng: random.Random) -> list[dict]:
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    picked = []
    for label in sorted(by_label):
        members = by_label[label]
        picked += rng.sample(members, max(1, round(n * len(members) / len(rows))))
    rng.shuffle(picked)
    return picked[:n]


def main(repo: Path) -> None:
    rng = random.Random(SEED)
    examples = json.loads(show(repo, TRAIN))["rasa_nlu_data"]["common_examples"]
    train = [{"text": e["text"].strip(), "label": e["intent"].split("_")[0]} for e in examples if e["text"].strip()]
    listing = subprocess.run(
        ["git", f"--git-dir={_git_dir(repo)}", "ls-tree", "--name-only", f"{COMMIT}:{FOLD}/testset/csv/"],
        check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    test = []
    for name in sorted(listing):
        for row in csv.DictReader(io.StringIO(show(repo, f"{FOLD}/testset/csv/{name}")), delimiter=";"):
            if row["answer_from_anno"].strip():
                test.append({"text": row["answer_from_anno"].strip(), "label": row["scenario"]})
    seen = {r["text"].lower() for r in test}
    train = [r for r in train if r["text"].lower() not in seen]  # no test phrasing among the training rows
    out = Path(__file__).resolve().parent
    for split, rows in (("train", train), ("test", test)):
        sample = stratified(rows, SIZES[split], rng)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sample))
        print(f"{split}: {len(sample)} rows of {len(rows)}, {len({r['label'] for r in sample})} labels")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

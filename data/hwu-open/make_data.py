"""Build train.jsonl / validation.jsonl / test.jsonl from HWU64 (Liu et al., IWSDS 2019), CC BY 4.0, in the
open-intent protocol: some intents are kept out of training and their requests are labelled out_of_scope.

Source: https://github.com/xliuhw/NLU-Evaluation-Data at commit f6071b496b17d71e6eb43f543af0707f4ff30557,
cross-validation fold 1 (the files data/hwu-scenarios/ reads). The label is the full intent (alarm_set,
play_music, ...). Of the 64 intents, a seeded 48 are known; the other 16 are split into two disjoint groups
of 8: the requests of the first group are the out_of_scope rows of the validation file (a threshold for
"none of these" is chosen there), those of the second the out_of_scope rows of the test file, so no test
out_of_scope request comes from an intent seen anywhere before. No out_of_scope row is in training.

- train.jsonl: a stratified sample of the known intents' rows of the fold's training file (about 1,440 rows).
- validation.jsonl: other known-intent rows of the fold's training file (about 240) and the first group's (about 80).
- test.jsonl: a stratified sample of the known intents' rows of the fold's test files (about 384) and every row of
  the second group's test rows.

    python data/hwu-open/make_data.py /path/to/NLU-Evaluation-Data (a clone, or a bare git directory)
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
KNOWN, UNKNOWN_EACH = 48, 8  # intents: known, then unknown for validation and unknown for test
SIZES = {"train": 1440, "validation_known": 240, "validation_unknown": 80, "test_known": 384}
OUT_OF_SCOPE = "out_of_scope"
SEED = 0


def show(repo: Path, path: str) -> str:
    return subprocess.run(
        ["git", f"--git-dir={_git_dir(repo)}", "show", f"{COMMIT}:{path}"], check=True, capture_output=True, text=True
    ).stdout


def _git_dir(repo: Path) -> Path:
    return repo / ".git" if (repo / ".git").exists() else repo


def stratified(rows: list[dict], n: int, rng: random.Random) -> list[dict]:
    """About n rows, each label at its share (at least one), shuffled."""
    if n >= len(rows):
        return rng.sample(rows, len(rows))
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    picked = []
    for label in sorted(by_label):
        members = by_label[label]
        picked += rng.sample(members, min(len(members), max(1, round(n * len(members) / len(rows)))))
    rng.shuffle(picked)
    return picked[:n]


def read(repo: Path) -> tuple[list[dict], list[dict]]:
    examples = json.loads(show(repo, TRAIN))["rasa_nlu_data"]["common_examples"]
    train = [{"text": e["text"].strip(), "label": e["intent"]} for e in examples if e["text"].strip()]
    listing = subprocess.run(
        ["git", f"--git-dir={_git_dir(repo)}", "ls-tree", "--name-only", f"{COMMIT}:{FOLD}/testset/csv/"],
        check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    test = []
    for name in sorted(listing):
        for row in csv.DictReader(io.StringIO(show(repo, f"{FOLD}/testset/csv/{name}")), delimiter=";"):
            if row["answer_from_anno"].strip():
                test.append({"text": row["answer_from_anno"].strip(), "label": f"{row['scenario']}_{row['intent']}"})
    seen = {r["text"].lower() for r in test}
    train = [r for r in train if r["text"].lower() not in seen]  # no test phrasing among the training rows
    return train, test


def main(repo: Path) -> None:
    rng = random.Random(SEED)
    pool, test_pool = read(repo)
    intents = sorted({r["label"] for r in pool} & {r["label"] for r in test_pool})
    shuffled = rng.sample(intents, len(intents))
    known = set(shuffled[:KNOWN])
    unknown_validation = set(shuffled[KNOWN : KNOWN + UNKNOWN_EACH])
    unknown_test = set(shuffled[KNOWN + UNKNOWN_EACH : KNOWN + 2 * UNKNOWN_EACH])
    known_rows = [r for r in pool if r["label"] in known]
    train = stratified(known_rows, SIZES["train"], rng)
    taken = {id(r) for r in train}
    rest = [r for r in known_rows if id(r) not in taken]
    validation = stratified(rest, SIZES["validation_known"], rng) + [
        {"text": r["text"], "label": OUT_OF_SCOPE}
        for r in stratified([r for r in pool if r["label"] in unknown_validation], SIZES["validation_unknown"], rng)
    ]
    test = stratified([r for r in test_pool if r["label"] in known], SIZES["test_known"], rng) + [
        {"text": r["text"], "label": OUT_OF_SCOPE} for r in test_pool if r["label"] in unknown_test
    ]
    rng.shuffle(validation)
    rng.shuffle(test)
    out = Path(__file__).resolve().parent
    for split, rows in (("train", train), ("validation", validation), ("test", test)):
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        scope = sum(r["label"] == OUT_OF_SCOPE for r in rows)
        print(f"{split}: {len(rows)} rows, {len({r['label'] for r in rows})} labels, {scope} out_of_scope")
    print("unknown in validation:", ", ".join(sorted(unknown_validation)))
    print("unknown in test:", ", ".join(sorted(unknown_test)))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

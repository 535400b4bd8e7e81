"""The checks on teacher-written rows: duplicates, near-duplicates, copies of seeds and contamination are caught
with the row they match; the summaries say what the kept set looks like."""

from __future__ import annotations

import numpy as np

from pipeline import row_checks


def _bag_of_words(texts: list[str]) -> np.ndarray:
    """A stand-in encoder: word counts over a shared vocabulary (near-equal wordings, near-equal vectors)."""
    vocabulary = sorted({w for t in texts for w in row_checks.normalized(t).split()} | {"<none>"})
    index = {w: i for i, w in enumerate(vocabulary)}
    out = np.zeros((len(texts), len(vocabulary)), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in row_checks.normalized(text).split():
            out[row, index[word]] += 1
    return out


def embed_with(all_texts: list[str]):
    vectors = dict(zip(all_texts, _bag_of_words(all_texts), strict=True))
    return lambda texts: np.stack([vectors[t] for t in texts]) if texts else np.zeros((0, 1))


SEEDS = ["where is my parcel", "I want my money back for the blue shoes"]
HELD_OUT = ["how do I reset my password please", "cancel order 1234 now"]
NEW = [
    "Where is my   PARCEL",  # 0: a seed, but for case and spaces
    "can you track my order from last week",  # 1: kept
    "Can you track my order from last week",  # 2: a duplicate of 1
    "how do I reset my password please!",  # 3: near an eval row
    "could you track my order from last week",  # 4: near 1
    "my refund has not arrived yet",  # 5: kept
    "   ",  # 6: empty
    "HOW DO I RESET MY PASSWORD PLEASE",  # 7: an eval row, exactly
]


def test_each_new_row_is_kept_or_dropped_with_the_row_it_matches():
    embed = embed_with(SEEDS + HELD_OUT + NEW)
    verdicts = row_checks.check_rows(NEW, SEEDS, HELD_OUT, embed, near=0.85)
    assert verdicts.kept == [1, 5]
    assert verdicts.dropped[0] == {"reason": "copy_of_seed", "seed_row": 0, "similarity": 1.0}
    assert verdicts.dropped[2] == {"reason": "duplicate", "of_row": 1, "similarity": 1.0}
    assert verdicts.dropped[3]["reason"] == "contamination" and verdicts.dropped[3]["held_out_row"] == 0
    assert verdicts.dropped[3]["similarity"] >= 0.85
    assert verdicts.dropped[4]["reason"] == "near_duplicate" and verdicts.dropped[4]["of_row"] == 1
    assert verdicts.dropped[6] == {"reason": "empty"}
    assert verdicts.dropped[7] == {"reason": "contamination", "held_out_row": 0, "similarity": 1.0}
    assert verdicts.counts() == {"copy_of_seed": 1, "duplicate": 1, "contamination": 2, "near_duplicate": 1, "empty": 1}


def test_without_a_similarity_threshold_only_exact_copies_are_dropped():
    verdicts = row_checks.check_rows(NEW, SEEDS, HELD_OUT, embed=None, near=None)
    assert verdicts.kept == [1, 3, 4, 5]
    assert {row: d["reason"] for row, d in verdicts.dropped.items()} == {
        0: "copy_of_seed", 2: "duplicate", 6: "empty", 7: "contamination"
    }  # fmt: skip


def test_the_kept_set_is_described():
    assert row_checks.distinct_ngrams(["a b c", "a b d"], 2) == 3 / 4  # (a b) twice, (b c), (b d)
    assert row_checks.distinct_ngrams(["a"], 2) is None
    vectors = [[1, 0], [1, 0.1], [0, 1]]
    within = row_checks.nearest_similarity(vectors)
    assert within[0] == within[1] > 0.99 and within[2] < 0.1
    assert row_checks.nearest_similarity([[1, 0]], others=[[0, 1], [1, 1]]) == [round(1 / np.sqrt(2), 4)]
    assert row_checks.length_summary(["one two", "one two three four", "a"]) == {
        "rows": 3,
        "p05": 1,
        "p50": 2,
        "p95": 4,
    }
    assert row_checks.balance(["a", "a", "b"], {"a": 3, "b": 3, "c": 3}) == {
        "a": {"asked": 3, "kept": 2}, "b": {"asked": 3, "kept": 1}, "c": {"asked": 3, "kept": 0}
    }  # fmt: skip

"""Files that are never half written: atomic writes, folder swaps, append-only JSON-lines caches, sizes, and
where the caches shared by runs live.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """$SPECIALIST_CACHE, else ~/.cache/specialist: converted models, llama.cpp builds, crash logs."""
    return Path(os.environ.get("SPECIALIST_CACHE") or Path.home() / ".cache" / "specialist")


# --- atomic writes ------------------------------------------------------------------------------


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temp file beside the target, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written temp folder into place, replacing an older one.

    Two renames: the old folder aside, the new one in. Whatever moment a kill comes, the final path holds
    either a complete folder or none (never half of one); the stage's done marker is gone before this
    runs (start_stage), so a folder missing after a kill is redone, and the aside copy is removed then.
    """
    old = None
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        remove_path(old)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old is not None:
        shutil.rmtree(old)


def temp_dir_for(final_dir: Path) -> Path:
    tmp = final_dir.with_name(f".{final_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# --- append-only caches (generations, teacher answers, training metrics) -------------------------


def read_jsonl_records(path: Path) -> list[dict]:
    """The records of an append-only JSON-lines cache, the same way for every cache.

    A kill can cut the last line short; a line that is not a whole JSON object (that one, or a damaged
    one) is dropped, and the file is rewritten without it (atomically), so the next append starts on a
    line of its own and no reader sees the damage twice.
    """
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    records, damaged = [], False
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            damaged = True
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            damaged = True
    if damaged or (text and not text.endswith("\n")):
        write_jsonl_atomic(path, records)
    return records


def append_jsonl(path: Path, records: list[dict]) -> None:
    """Append whole lines, flushed at once: a kill loses at most the line being written."""
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(record) + "\n" for record in records))


def write_jsonl_atomic(path: Path, records: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in records))


def dir_size_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))

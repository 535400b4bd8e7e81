"""The machine and software a run was made on, as the manifest and every timing name them."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "evaluate"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_facts() -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu_description(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["gpu_count"] = torch.cuda.device_count()
    return facts


def cpu_name() -> str:
    """The CPU's model name (what every timing is measured on)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_description() -> str:
    """The CPU as a measurement should name it: model name, family/model numbers, and the vector units that decide
    how fast bf16 runs (a virtual machine often reports only "AMD EPYC")."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return cpu_name()
    flags = set(fields.get("flags", "").split())
    units = [name for name in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if name in flags]
    family = f"family {fields['cpu family']} model {fields['model']}" if "cpu family" in fields else ""
    details = "; ".join(part for part in (family, " ".join(units)) if part)
    return f"{cpu_name()} ({details})" if details else cpu_name()


def git_commit() -> str | None:
    return _git("rev-parse", "HEAD") or None


def git_changed() -> bool | None:
    """Whether the package's tracked files differ from that commit: a figure measured then came from code the
    commit alone does not reproduce. None outside a git checkout."""
    out = _git("status", "--porcelain", "--untracked-files=no", "--", ".")
    return None if out is None else bool(out)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()

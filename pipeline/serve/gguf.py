"""`specialist serve MODEL`: llama.cpp's own OpenAI-compatible server (llama-cpp-python's) on a GGUF file.

For a reference or teacher behind an endpoint on this machine: a packaged model's GGUF as it ships (no
conversion to PyTorch), any .gguf file, or a run's quantized specialist. The server is llama-cpp-python's
`python -m llama_cpp.server` (the `serve` extra brings its web dependencies), started through
pipeline/serve/gguf_server.py, which answers a malformed request with a 400 where that server answers 500; this
module only finds the file, checks what it needs, and starts it. An API key, where wanted, is read from the
environment variable named by --api-key-env and handed to the server in its environment, never on its command line.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from pipeline import llamacpp_install, models
from pipeline.errors import PipelineError

SERVER_MODULES = ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")


def gguf_file(ref: str) -> Path:
    """The GGUF file behind a model reference: packaged:NAME (installed from its wheels) or a .gguf path."""
    if ref.startswith("packaged:"):
        return models.packaged_gguf(ref.removeprefix("packaged:"), "serve")
    path = Path(ref).expanduser()
    if path.is_dir() and (path / "model.gguf").is_file():  # a run's quantize/gguf-<type>/ folder
        path = path / "model.gguf"
    if path.suffix != ".gguf" or not path.is_file():
        raise PipelineError(
            f"serve: {ref} is not a GGUF file; give packaged:NAME ({', '.join(models.PACKAGED)}), a .gguf file, "
            "or a run's quantize/gguf-<type>/ folder"
        )
    return path


def command(gguf: Path, alias: str, host: str, port: int, threads: int, context: int) -> list[str]:
    return [
        sys.executable, "-m", "pipeline.serve.gguf_server",  # llama_cpp.server, refusing bad bodies with a 400
        "--model", str(gguf), "--model_alias", alias,
        "--host", host, "--port", str(port),
        "--n_ctx", str(context), "--n_threads", str(threads), "--n_threads_batch", str(threads),
        "--flash_attn", "true",  # llama.cpp's own server default where the backend has it
        "--verbose", "false",
    ]  # fmt: skip


def environment(api_key_env: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("API_KEY", None)  # the server reads its key from API_KEY (pydantic settings): only ours
    if api_key_env:
        key = os.environ.get(api_key_env, "").strip()
        if not key:
            raise PipelineError(f"serve: --api-key-env {api_key_env}: the variable is not set (or empty)")
        env["API_KEY"] = key
    return env


def require_modules(modules: tuple[str, ...] = SERVER_MODULES) -> None:
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise PipelineError(f"serve: the server needs {', '.join(missing)}: .venv/bin/pip install -e '.[serve]'")


def prepare(ref: str) -> Path:
    """The GGUF file, with llama-cpp-python built and the server's dependencies checked."""
    require_modules()
    gguf = gguf_file(ref)
    llamacpp_install.ensure()
    return gguf


def start(
    ref: str,
    alias: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    threads: int | None = None,
    context: int = 4096,
    api_key_env: str | None = None,
    **popen,
) -> subprocess.Popen:
    """Start the server as a child process (the caller waits on it or stops it)."""
    gguf = prepare(ref)
    name = alias or (ref.removeprefix("packaged:") if ref.startswith("packaged:") else gguf.stem)
    threads = threads or os.cpu_count() or 1
    return subprocess.Popen(command(gguf, name, host, port, threads, context), env=environment(api_key_env), **popen)

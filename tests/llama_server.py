"""llama.cpp's OpenAI-compatible server (llama-cpp-python's), started by `specialist serve`'s own code on
127.0.0.1 with the packaged SmolLM2 GGUF: the real protocol the endpoint runtime speaks to hosted APIs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipeline.serve import gguf as serve

MODEL = "packaged:smollm2-135m-instruct"
ALIAS = "smollm2"


@dataclass
class LlamaServer:
    process: subprocess.Popen
    port: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def requests(self) -> int:
        """Completion requests the server has answered (its access log)."""
        return sum("POST /v1/" in line for line in self.log.read_text(errors="replace").splitlines())

    def stop(self) -> None:
        stop_process(self.process, timeout=10)


def stop_process(process: subprocess.Popen, timeout: float) -> None:
    """Terminate a server the tests started, and kill it if it does not go within `timeout` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(log: Path, port: int | None = None, api_key_env: str | None = None) -> LlamaServer:
    port = port or free_port()
    with log.open("a") as out:
        process = serve.start(
            MODEL, ALIAS, port=port, threads=2, context=1024, api_key_env=api_key_env, stdout=out, stderr=out
        )
    server = LlamaServer(process, port, log)
    deadline = time.time() + 90
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama.cpp's server exited ({process.returncode}):\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{server.base_url}/models", timeout=2) as response:
                if json.load(response)["data"]:
                    return server
        except OSError as error:
            if getattr(error, "code", None) == 401:  # up, and wants its key
                return server
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"llama.cpp's server did not answer within 90 s:\n{log.read_text()[-2000:]}")


class Specialist:
    """`specialist serve ...` (the cascade, the adapters) as a user starts it, in a process of its own, on a free
    port; ready when /health answers."""

    def __init__(self, log: Path, *args: str, env: dict | None = None):
        self.port = free_port()
        command = [sys.executable, "-m", "pipeline", "serve", *args, "--port", str(self.port)]
        with log.open("a") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=out, env={**os.environ, **(env or {})})
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}):\n{log.read_text()[-3000:]}")
            try:
                self.get("/health")
                return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the server did not answer within 120 s:\n{log.read_text()[-3000:]}")

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
            return json.load(response)

    def post(self, path: str, body: dict, key: str | None = None) -> tuple[int, dict, dict]:
        """(status, headers, body) of a POST, with `key` as the bearer token where given."""
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", json.dumps(body).encode(), headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, dict(response.headers), json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), json.load(error)

    def stop(self) -> None:
        stop_process(self.process, timeout=20)

"""Runtimes: "generate these prompts greedily and measure what it cost", one per way a candidate runs.

`transformers` runs a model folder (full precision, an adapter on a base, bitsandbytes) in this process;
`llamacpp` runs a GGUF file through llama.cpp in a process of its own; `endpoint` asks a model behind an
OpenAI-compatible API. All take the same job and report the same facts, so the evaluation and the report
treat every candidate alike.

A job's entries, one per row: {"row", "prediction", "generated_tokens", "seconds", "stopped"} where
`seconds` is the row's share of its batch and `stopped` says generation ended at the end token
rather than at max_new_tokens.
"""

from __future__ import annotations

import gc
import queue as queue_module
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from pipeline import data
from pipeline.errors import PipelineError, RuntimeFailure
from pipeline.logs import write_crash_log


@dataclass(frozen=True)
class Prompt:
    """One eval row's prompt, in the two forms runtimes take."""

    ids: list[int]  # token ids from the training/eval tokenizer
    text: str  # the same prompt as text (chat-rendered where the chat template is used)
    add_special: bool  # the tokenizer adds its special tokens (BOS) to this text: plain prompts do
    messages: tuple[dict, ...] | None = None  # chat turns, for an API that applies the template itself


@dataclass(frozen=True)
class Sampling:
    """Sampled instead of greedy answers (a teacher writing new rows): temperature, then nucleus (top_p)."""

    temperature: float
    top_p: float
    seeds: list[int]  # one per prompt: the row's draw (a batch of the transformers runtime: its first row's seed)


@dataclass(frozen=True)
class GenerationJob:
    prompts: list[Prompt]
    todo: list[int]  # rows not yet in the generation cache
    latency_rows: list[int]  # rows timed again as single requests (batch 1) after a warm-up
    max_new_tokens: int
    batch_size: int
    threads: int
    # with each answer, the model's probability of it: the product of its tokens' probabilities (the end
    # token included where it stopped), the same definition in every local runtime
    confidence: bool = False
    sampling: Sampling | None = None  # None: greedy


OnBatch = Callable[[list[dict]], None]


def prompts_for(tokenizer, rows: list, chat: bool, system: str | None = None) -> list[Prompt]:
    """Each eval row's prompt, built by the same code training uses (pipeline.data)."""
    prompts = []
    for row in rows:
        text, add_special = data.prompt_text(tokenizer, row, chat, system)
        prompts.append(Prompt(tokenizer(text, add_special_tokens=add_special)["input_ids"], text, add_special))
    return prompts


def over_context(
    prompt_tokens: list[int], rows: list, max_new_tokens: int, context: int | None, model: str
) -> str | None:
    """Why some eval rows cannot be answered within the model's context (prompt + max_new_tokens tokens past
    max_position_embeddings), naming the longest row; None where every row fits. A model asked past its context
    answers garbage (rotary positions it never saw) or fails: refuse, name the rows, let the user choose."""
    if not context:
        return None
    over = [i for i, n in enumerate(prompt_tokens) if n + max_new_tokens > context]
    if not over:
        return None
    longest = max(over, key=lambda i: prompt_tokens[i])
    return (
        f"{len(over)} eval rows do not fit {model}'s context of {context} tokens with evaluate.max_new_tokens "
        f"{max_new_tokens} (the longest: {rows[longest].source}, {prompt_tokens[longest]} prompt tokens); shorten or "
        "remove those rows, or lower evaluate.max_new_tokens"
    )


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class PeakMemory:
    """Peak memory used while loading and running one candidate (which has a process of its own).

    CUDA (cuda=True): the allocator's peak. CPU: the process's peak resident memory above its resident
    memory on entry (the interpreter with its runtime imported), so the figure is the model's weights,
    activations and caches. On Linux the peak is the kernel's own high-water mark (VmHWM, reset on entry
    through /proc/self/clear_refs), exact; elsewhere the RSS sampled every 5 ms. `process_peak_bytes` is
    the whole process's peak, interpreter and libraries included.
    """

    def __init__(self, interval_seconds: float = 0.005, cuda: bool | None = None):
        self.interval_seconds = interval_seconds
        self.peak_bytes = 0
        self.process_peak_bytes = 0
        self._cuda = cuda
        self._stop = threading.Event()

    def __enter__(self):
        gc.collect()
        if self._cuda is None:
            import torch

            self._cuda = torch.cuda.is_available()
        if self._cuda:
            import torch

            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self._baseline = torch.cuda.memory_allocated()
        self._process = psutil.Process()
        self._kernel_peak = _reset_peak_rss()
        self._rss_baseline = self._process.memory_info().rss
        self._rss_peak = self._rss_baseline
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval_seconds):
            self._rss_peak = max(self._rss_peak, self._process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._rss_peak = max(self._rss_peak, self._process.memory_info().rss)
        if self._kernel_peak:
            self._rss_peak = max(self._rss_peak, _peak_rss_bytes() or 0)
        self.process_peak_bytes = self._rss_peak
        if self._cuda:
            import torch

            self.peak_bytes = torch.cuda.max_memory_allocated() - self._baseline
        else:
            self.peak_bytes = self._rss_peak - self._rss_baseline
        return False


RAPL = Path("/sys/class/powercap")


class DeviceCost:
    """What a stretch of answering costs the device: this process's CPU time over all its threads (llama.cpp's
    threads included: it runs in the process), and the energy counter where the machine exposes one: Linux
    RAPL (the CPU packages' energy, every process on them counted) or, on CUDA, NVML's (the GPU's). Where
    neither is readable, energy is None and `energy_counter` says so."""

    def __init__(self, cuda: bool = False):
        self._cuda = cuda

    def __enter__(self):
        self._process = psutil.Process()
        self._cpu = self._cpu_seconds()
        self.energy_counter, self._energy = _energy_reading(self._cuda)
        return self

    def _cpu_seconds(self) -> float:
        times = self._process.cpu_times()
        return times.user + times.system

    def __exit__(self, *exc):
        self.cpu_seconds = self._cpu_seconds() - self._cpu
        self.energy_joules = None
        if self.energy_counter is not None:
            _, now = _energy_reading(self._cuda)
            self.energy_joules = _energy_used(self._energy, now)
        return False

    def facts(self, prefix: str) -> dict:
        return {
            f"{prefix}_cpu_seconds": self.cpu_seconds,
            f"{prefix}_energy_joules": self.energy_joules,
            "energy_counter": self.energy_counter,
        }


def _energy_reading(cuda: bool) -> tuple[str | None, dict | None]:
    """(counter name, {domain: (joules, wraps at joules)}) from NVML on CUDA, else RAPL packages, else (None, None)."""
    if cuda:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            return "nvml", {"gpu0": (pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000, None)}
        except Exception:  # noqa: BLE001 - no pynvml, no driver support: no energy figure, said so
            return None, None
    domains = {}
    for zone in sorted(RAPL.glob("intel-rapl:[0-9]*")) if RAPL.is_dir() else []:  # packages, not their subzones
        if zone.name.count(":") != 1:
            continue
        try:
            joules = int((zone / "energy_uj").read_text()) / 1e6
            wraps = int((zone / "max_energy_range_uj").read_text()) / 1e6
        except (OSError, ValueError):  # unreadable without root on recent kernels
            return None, None
        domains[zone.name] = (joules, wraps)
    return ("rapl", domains) if domains else (None, None)


def _energy_used(before: dict, after: dict) -> float:
    total = 0.0
    for domain, (joules, wraps) in after.items():
        used = joules - before[domain][0]
        total += used + wraps if used < 0 and wraps else used  # the counter wrapped once
    return total


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux 4.0+); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _peak_rss_bytes() is not None


def _peak_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# --- candidates in processes of their own --------------------------------------------------------


def run_in_child(context, target, args: tuple, on_batch: OnBatch, what: str) -> dict:
    """Run target(*args, on_batch) in a child process of `context`, passing each batch it reports to on_batch
    as it comes, and return the facts it returns.

    A PipelineError in the child is raised here with its message and exit code; any other failure, or a
    child that dies without a word (out of memory), becomes a RuntimeFailure whose traceback goes to a crash
    log. The child is stopped when this returns or raises (a signal, an error in on_batch).
    """
    messages = context.Queue()
    child = context.Process(target=_child_main, args=(target, args, messages), name=what)
    child.start()
    try:
        while True:
            try:
                kind, payload = messages.get(timeout=5)
            except queue_module.Empty:
                if not child.is_alive():
                    raise RuntimeFailure(
                        f"{what}: its process died (exit code {child.exitcode}) without an answer: out of memory, "
                        "or killed (a build of llama.cpp for another CPU dies this way too: delete "
                        "$SPECIALIST_CACHE/llama.cpp to rebuild it)"
                    ) from None
                continue
            if kind == "batch":
                on_batch(payload)
            elif kind == "done":
                child.join(timeout=30)  # it exits on its own once its answer is sent
                return payload
            elif kind == "user_error":
                error = PipelineError(payload["message"])
                error.exit_code = payload["exit_code"]
                raise error
            else:
                log_path = write_crash_log(payload["traceback"])
                raise RuntimeFailure(
                    f"{what}: failed in its own process ({payload['summary']}); traceback in {log_path}"
                )
    finally:  # done, or stopped (a signal, an error here): a child still at work is not left running
        if child.is_alive():
            child.kill()
        child.join()


def _child_main(target, args: tuple, messages) -> None:
    try:
        facts = target(*args, lambda batch: messages.put(("batch", batch)))
        messages.put(("done", facts))
    except PipelineError as e:
        messages.put(("user_error", {"message": str(e), "exit_code": e.exit_code}))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent, which names the candidate
        text = str(e).strip()
        summary = f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"
        messages.put(("crash", {"summary": summary, "traceback": traceback.format_exc()}))

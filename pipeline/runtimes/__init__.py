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
import threading
from collections.abc import Callable
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Prompt:
    """One eval row's prompt, in the two forms runtimes take."""

    ids: list[int]  # token ids from the training/eval tokenizer
    text: str  # the same prompt as text (chat-rendered where the chat template is used)
    add_special: bool  # the tokenizer adds its special tokens (BOS) to this text: plain prompts do
    messages: tuple[dict, ...] | None = None  # chat turns, for an API that applies the template itself


@dataclass(frozen=True)
class GenerationJob:
    prompts: list[Prompt]
    todo: list[int]  # rows not yet in the generation cache
    latency_rows: list[int]  # rows timed again as single requests (batch 1) after a warm-up
    max_new_tokens: int
    batch_size: int
    threads: int


OnBatch = Callable[[list[dict]], None]


def prompts_for(tokenizer, rows: list, chat: bool, system: str | None = None) -> list[Prompt]:
    """Each eval row's prompt, built by the same code training uses (pipeline.data)."""
    from pipeline import data

    prompts = []
    for row in rows:
        text, add_special = data.prompt_text(tokenizer, row, chat, system)
        prompts.append(Prompt(tokenizer(text, add_special_tokens=add_special)["input_ids"], text, add_special))
    return prompts


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class PeakMemory:
    """Peak memory used while loading and running one candidate.

    CUDA (cuda=True): the allocator's peak. CPU: the highest process RSS sampled every 5 ms, minus the
    RSS before loading, so models evaluated earlier in the same process do not count.
    """

    def __init__(self, interval_seconds: float = 0.005, cuda: bool | None = None):
        self.interval_seconds = interval_seconds
        self.peak_bytes = 0
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
        if self._cuda:
            import torch

            self.peak_bytes = torch.cuda.max_memory_allocated() - self._baseline
        else:
            self.peak_bytes = self._rss_peak - self._rss_baseline
        return False

"""Which precision the frozen base's products run in on this CPU, chosen by timing them here.

A bf16 matmul on a CPU is ~6x faster than fp32 with Intel AMX tiles, ~4.5x with AVX512-BF16 (AMD Zen 4/5), and
5-400x slower where bf16 is emulated (AVX2 machines): no feature name predicts it well, so a short probe times
the model's own linear-layer shapes in fp32, bf16 and fp16, each the way training runs it (the fp32 input cast
to the frozen weight's dtype, the product, the output cast back), and the fastest wins where it beats fp32 by
at least MIN_SPEEDUP. The figures are cached per CPU, torch build, thread count and shapes in
$SPECIALIST_CACHE/precision/, probed under a lock so two runs never time each other's load, and every choice
carries the figures it was made on (validate, train/result.json, the report).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from pipeline.files import cache_root, write_json_atomic
from pipeline.machine import cpu_name
from pipeline.processes import cache_lock

DTYPES = ("float32", "bfloat16", "float16")
MIN_SPEEDUP = 1.25  # below this the rounding is not worth it: casts and the rest of a step eat a small gain
PROBE_TOKENS = 512  # rows of the timed products: a training batch's tokens (8 rows of ~64)
SECONDS_PER_PRODUCT = 0.15


def layer_shapes(config) -> list[tuple[int, int, int]]:
    """(in, out, count per layer) of a decoder layer's linear products, from a transformers config."""
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    return [(hidden, heads * head_dim, 2), (hidden, kv, 2), (hidden, intermediate, 2), (intermediate, hidden, 1)]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def probe(shapes: list[tuple[int, int, int]], threads: int | None = None, use_cache: bool = True) -> dict:
    """GFLOP/s of the shapes' products per dtype on this CPU (cached), with the dtype chosen and why."""
    threads = threads or torch.get_num_threads()
    identity = {
        "cpu": cpu_name(),
        "cpu_flags": hashlib.sha256(_cpu_flags().encode()).hexdigest()[:16],
        "torch": torch.__version__,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads,
        "shapes": [list(s) for s in shapes],
        "tokens": PROBE_TOKENS,
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_root() / "precision" / f"{key}.json"
    if use_cache and path.is_file():
        return {**json.loads(path.read_text()), "cached": True}
    with cache_lock(f"precision-{key}", "timing matmuls for the precision probe"):  # never two probes at once
        if use_cache and path.is_file():
            return {**json.loads(path.read_text()), "cached": True}
        started = time.perf_counter()
        rates = _time_products(shapes, threads)
        found = {**identity, "gflops": rates, **choose(rates), "seconds": round(time.perf_counter() - started, 2)}
        found["probed_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        found["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        if use_cache:
            write_json_atomic(path, found)
    return {**found, "cached": False}


def frozen_precision(recipe, dtype: torch.dtype, config) -> dict:
    """train.frozen_dtype resolved, with why: {"dtype", "why", "probe"}. auto on a CPU computing in fp32 times
    the base's own linear shapes in each precision (probe) and holds the frozen weights in the
    fastest where that pays; the probe's figures go to result.json and the report."""
    setting = recipe.train.frozen_dtype
    if setting != "auto":
        return {"dtype": setting, "why": "train.frozen_dtype", "probe": None}
    model_dtype = str(dtype).removeprefix("torch.")
    if recipe.train.qlora or recipe.lora.dora:
        why = "QLoRA's base is 4-bit" if recipe.train.qlora else "DoRA computes its weight norms from the base"
        return {"dtype": model_dtype, "why": f"auto: {why}, kept as it is", "probe": None}
    if torch.cuda.is_available() or dtype != torch.float32:
        return {"dtype": model_dtype, "why": f"auto: the whole model computes in {model_dtype}", "probe": None}
    found = probe(layer_shapes(config))
    return {"dtype": found["chosen"], "why": f"auto: {found['why']}", "probe": found}


def evaluation_dtype(setting: str, model_dtype: str, config) -> torch.dtype:
    """evaluate.dtype resolved for a PyTorch candidate whose transformers config is `config`."""
    from pipeline.models import compute_dtype

    if setting == "model":
        return compute_dtype(model_dtype)
    if setting != "auto":
        return getattr(torch, setting)
    if torch.cuda.is_available():
        return compute_dtype("auto")
    return getattr(torch, probe(layer_shapes(config))["chosen"])


def choose(rates: dict[str, float | None]) -> dict:
    """The fastest dtype, where it beats fp32 by MIN_SPEEDUP; else fp32."""
    fp32 = rates["float32"]
    best = max((d for d in DTYPES if rates.get(d)), key=lambda d: rates[d])
    speedup = rates[best] / fp32
    if best == "float32" or speedup < MIN_SPEEDUP:
        slower = ", ".join(f"{d} {rates[d] / fp32:.2f}x" for d in DTYPES[1:] if rates.get(d))
        return {"chosen": "float32", "why": f"no lower precision is {MIN_SPEEDUP}x faster than fp32 here ({slower})"}
    return {"chosen": best, "why": f"{best} products {speedup:.2f}x as fast as fp32 on this CPU"}


def _time_products(shapes: list[tuple[int, int, int]], threads: int) -> dict[str, float | None]:
    """Per dtype: the FLOP-weighted rate of the shapes' products as training runs them (input cast in, output
    cast back to fp32 for the lower precisions); None where this torch cannot multiply in that dtype."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        rates = {}
        for name in DTYPES:
            dtype = getattr(torch, name)
            flop = seconds = 0.0
            try:
                for fan_in, fan_out, count in shapes:
                    x = torch.randn(PROBE_TOKENS, fan_in, generator=generator)
                    w = torch.randn(fan_out, fan_in, generator=generator).to(dtype)
                    seconds += count * _seconds_per_call(lambda x=x, w=w, dtype=dtype: _product(x, w, dtype))
                    flop += count * 2 * PROBE_TOKENS * fan_in * fan_out
            except RuntimeError:  # "not implemented for 'Half'" on builds without that kernel
                rates[name] = None
                continue
            rates[name] = round(flop / seconds / 1e9, 1)
        return rates
    finally:
        torch.set_num_threads(previous)


def _product(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float32:
        return torch.nn.functional.linear(x, w)
    return torch.nn.functional.linear(x.to(dtype), w).to(torch.float32)


def _seconds_per_call(call) -> float:
    started = time.perf_counter()
    call()  # warm-up: the kernel's first call allocates and may pack the weight
    warm_up = time.perf_counter() - started
    if warm_up > 2 * SECONDS_PER_PRODUCT:  # emulated: hundreds of times slower; one call tells enough
        return warm_up
    calls, started = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < SECONDS_PER_PRODUCT:
        call()
        calls += 1
    return (time.perf_counter() - started) / calls

"""The llama.cpp runtime: a GGUF file through llama-cpp-python, in a process of its own.

Each candidate runs in a fresh child process so its peak memory is its own (RSS above the child's
baseline before loading). Prompts go in as text and llama.cpp tokenizes them, as llama.cpp, Ollama or
LM Studio would for a user; the token counts it used come back with the answers. Requests run one at a
time (llama.cpp's Python API serves one sequence), greedy, stopping at the model's end-of-generation tokens; a
teacher writing rows samples instead (each row from its own seed), in a batch context (Sequences).
The evaluation's answers keep the KV cache of the prompt prefix a row shares with the row before it (the
template's instructions, a reference's system message and label list), as llama-server's prompt cache
does; the timed single requests start from a clean cache, as a first request does.
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.runtimes import DeviceCost, GenerationJob, OnBatch, PeakMemory, Prompt, Sampling, run_in_child


def run(gguf_file: Path, job: GenerationJob, on_batch: OnBatch, gpu: bool, lora_file: Path | None = None) -> dict:
    """Generate job.todo (reporting each batch of rows as it finishes) and time job.latency_rows. With lora_file,
    llama.cpp applies that LoRA GGUF to gguf_file (the shared base) as it loads."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch, no earlier models
    lora = str(lora_file) if lora_file else None
    what = f"llama.cpp {gguf_file}" + (f" with {lora_file}" if lora_file else "")
    return run_in_child(context, _generate, (str(gguf_file), job, gpu, lora), on_batch, what)


def open_model(
    gguf_file: str, n_ctx: int, threads: int, gpu: bool, logits_all: bool = False, lora_file: str | None = None
):
    import llama_cpp

    return llama_cpp.Llama(
        model_path=gguf_file,
        lora_path=lora_file,  # a LoRA GGUF applied to the model at scale 1 (alpha / r is in the file)
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        n_gpu_layers=-1 if gpu else 0,
        logits_all=logits_all,
        # llama.cpp's own tools (llama-server, llama-cli, Ollama's runner) default to flash attention "auto", on
        # wherever the backend has it; llama-cpp-python defaults to off. Measured: 15% faster SmolLM2 requests.
        flash_attn=True,
        seed=0,
        verbose=False,
    )


def load_adapter(llm, lora_file: str):
    """A LoRA GGUF loaded for this model (llama.cpp keeps it until the model is freed); not applied yet."""
    import llama_cpp

    adapter = llama_cpp.llama_adapter_lora_init(llm._model.model, lora_file.encode("utf-8"))
    if adapter is None:
        raise PipelineError(f"llama.cpp could not load the adapter {lora_file} for this base (see its log above)")
    return adapter


def use_adapter(llm, adapter) -> None:
    """Apply this one adapter at scale 1 (alpha / r is in its file) to the context's next requests; None: the base
    alone. llama.cpp changes the context only when the adapter differs from the one it has."""
    import ctypes

    import llama_cpp

    if adapter is None:
        status = llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, None, 0, None)
    else:
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
        status = llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, adapters, 1, (ctypes.c_float * 1)(1.0))
    if status != 0:
        raise PipelineError(f"llama.cpp refused to set the adapter on the context (status {status})")


def tokenize(llm, prompt: Prompt) -> list[int]:
    """The prompt text as llama.cpp tokenizes it: special tokens in the text parsed, BOS as the file says."""
    return llm.tokenize(prompt.text.encode("utf-8"), add_bos=prompt.add_special, special=True)


def complete(llm, ids: list[int], max_new_tokens: int, confidence: bool = False, reuse_prefix: bool = False) -> dict:
    """One greedy request from a clean KV cache: the answer text, tokens generated, and whether it stopped.

    reuse_prefix: keep the KV cache of the prompt prefix this request shares with the one before it (the
    template's instructions, a system message, a label list), as llama-server's prompt cache does: only the
    rest of the prompt is computed. For one model and adapter only: a cache is not valid across adapters.

    The answer is decoded with invalid UTF-8 replaced, as the transformers runtime decodes it, so the same
    tokens give the same text in both. With confidence, also the model's probability of the answer: the
    product of its tokens' probabilities, the end token included where it stopped (as the transformers
    runtime computes it), from the logits each token was chosen from.
    """
    import llama_cpp

    if not reuse_prefix:
        llm.reset()  # generate(reset=True) below then finds no prefix to keep
    answer: list[int] = []
    stopped = False
    log_p = 0.0
    started = time.perf_counter()
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        if confidence:
            log_p += _log_probability(llm, token)
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):  # llama.cpp's own end-of-generation set
            stopped = True
            break
        answer.append(token)
        if len(answer) >= max_new_tokens:
            break
    seconds = time.perf_counter() - started
    entry = {
        "prediction": llm.detokenize(answer, prev_tokens=ids).decode("utf-8", errors="replace").strip(),
        "generated_tokens": len(answer) + stopped,  # the end token counts, as elsewhere
        "seconds": seconds,
        "stopped": stopped,
    }
    if confidence:
        entry["confidence"] = math.exp(log_p)
    return entry


def _log_probability(llm, token: int) -> float:
    """log p(token) under the logits of the last position decoded: the ones `token` was chosen from. Read from
    the context (llama-cpp-python keeps its own copy only with logits_all, which slows every request)."""
    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).astype(np.float64)
    top = logits.max()
    return float(logits[token] - top - np.log(np.exp(logits - top).sum()))


def _generate(gguf_file: str, job: GenerationJob, gpu: bool, lora_file: str | None, on_batch: OnBatch) -> dict:
    import llama_cpp  # noqa: F401 - the runtime's own code is not the candidate's memory (torch is not either)

    # the peak is what serving one request at a time needs: the model, a context, a request (the batched
    # answers below decode in a context of their own, after this is measured)
    with PeakMemory(cuda=False) as memory:
        started = time.perf_counter()
        # context: the longest prompt (its HF token count, plus slack for a tokenizer that differs) + answer
        n_ctx = max(len(p.ids) for p in job.prompts) + job.max_new_tokens + 64
        llm = open_model(gguf_file, n_ctx, job.threads, gpu, lora_file=lora_file)
        load_seconds = time.perf_counter() - started
        ids = [tokenize(llm, p) for p in job.prompts]
        complete(llm, ids[0], job.max_new_tokens)  # warm-up, untimed
        with DeviceCost(cuda=gpu) as device_cost:  # llama.cpp's threads are this process's
            single = [complete(llm, ids[row], job.max_new_tokens)["seconds"] for row in job.latency_rows]
    if job.todo and job.batch_size == 1 and job.sampling is None:  # each row alone from a clean cache, as served
        for row in job.todo:
            on_batch([{"row": row, **complete(llm, ids[row], job.max_new_tokens, job.confidence)}])
    elif job.todo:
        rows = min(job.batch_size, len(job.todo))
        together = Sequences(llm, rows, max(len(ids[row]) for row in job.todo) + job.max_new_tokens + 8, job.threads)
        for start in range(0, len(job.todo), rows):
            batch = job.todo[start : start + rows]
            draws = [_Draw(job.sampling, job.sampling.seeds[row]) for row in batch] if job.sampling else None
            answers = together.answer([ids[row] for row in batch], job.max_new_tokens, job.confidence, draws)
            on_batch([{"row": row, **answer} for row, answer in zip(batch, answers, strict=True)])
    return {
        "runtime": "llama.cpp",
        "parameters": llm._model.n_params(),
        "dtype": gguf_type_name(llm.metadata),
        "weights_memory_bytes": sum(Path(f).stat().st_size for f in (gguf_file, lora_file) if f),
        "peak_memory_bytes": memory.peak_bytes,
        "process_peak_memory_bytes": memory.process_peak_bytes,
        "load_seconds": round(load_seconds, 3),
        "single_request_seconds": single,
        **device_cost.facts("single_request"),
        "prompt_tokens": [len(x) for x in ids],
        "device": "cuda" if gpu else "cpu",
        "threads": job.threads,
    }


class Sequences:
    """Greedy answers to several prompts decoded together, in a llama.cpp context of their own with one sequence
    per row (as llama-server's parallel slots decode): the prefix the prompts share is decoded once and its KV
    cells shared by every sequence (kept for the next batch where it shares it too), then every row's own prompt
    tokens in one batch, then one token per unfinished row per step. A row attends to its own sequence only, so
    it is computed as alone; what decoding together saves is reading the weights once per step for all rows.
    The model's LoRA adapter, where it has one, is applied to this context too."""

    def __init__(self, llm, rows: int, n_ctx_per_row: int, threads: int):
        import llama_cpp
        from llama_cpp import _internals

        params = type(llm.context_params).from_buffer_copy(llm.context_params)
        params.n_seq_max = rows
        params.kv_unified = True  # the shared prefix's cells serve every sequence
        params.n_ctx = rows * n_ctx_per_row
        params.n_batch = params.n_ctx  # a whole batch of prompts per decode call; llama.cpp splits it in ubatches
        params.n_ubatch = min(512, params.n_ctx)
        params.n_threads = params.n_threads_batch = threads
        self.llm, self.rows = llm, rows
        self.ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
        self.batch = _internals.LlamaBatch(n_tokens=params.n_ctx, embd=0, n_seq_max=1, verbose=False)
        self.vocab = llm._model.vocab
        self.n_vocab = llm.n_vocab()
        self.prefix: list[int] = []  # what sequence 0 holds of the last batch's shared prefix
        if llm._lora_adapter is not None:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(llm._lora_adapter)
            if llama_cpp.llama_set_adapters_lora(self.ctx.ctx, adapters, 1, (ctypes.c_float * 1)(1.0)) != 0:
                raise PipelineError("llama.cpp refused to set the adapter on the batch context")

    def answer(
        self, prompts: list[list[int]], max_new_tokens: int, confidence: bool, draws: list[_Draw] | None = None
    ) -> list[dict]:
        import llama_cpp

        started = time.perf_counter()
        shared = _shared_length(prompts)
        kept = _common_length(self.prefix, prompts[0][:shared])
        for seq in range(1, self.rows):
            self.ctx.kv_cache_seq_rm(seq, -1, -1)
        self.ctx.kv_cache_seq_rm(0, kept, -1)
        if shared > kept:
            self._decode([(0, position, prompts[0][position], False) for position in range(kept, shared)])
        self.prefix = prompts[0][:shared]
        for seq in range(1, len(prompts)):
            self.ctx.kv_cache_seq_cp(0, seq, -1, -1)
        entries = [{"ids": [], "log_p": 0.0, "stopped": False, "done": False} for _ in prompts]
        tokens = []  # (sequence, position, token, wants logits)
        for seq, prompt in enumerate(prompts):
            rest = prompt[shared:]
            tokens += [(seq, shared + k, token, k == len(rest) - 1) for k, token in enumerate(rest)]
        for _ in range(max_new_tokens + 1):
            outputs = self._decode(tokens)
            tokens = []
            for seq, index in outputs:
                entry = entries[seq]
                logits = np.ctypeslib.as_array(self.ctx.get_logits_ith(index), shape=(self.n_vocab,))
                token = int(logits.argmax()) if draws is None else draws[seq].token(logits)
                if confidence:
                    scaled = logits.astype(np.float64) - float(logits.max())
                    entry["log_p"] += float(scaled[token] - np.log(np.exp(scaled).sum()))
                if llama_cpp.llama_vocab_is_eog(self.vocab, token):
                    entry["stopped"] = entry["done"] = True
                    continue
                entry["ids"].append(token)
                if len(entry["ids"]) >= max_new_tokens:
                    entry["done"] = True
                    continue
                tokens.append((seq, len(prompts[seq]) + len(entry["ids"]) - 1, token, True))
            if not tokens:
                break
        seconds = (time.perf_counter() - started) / len(prompts)
        found = []
        for prompt, entry in zip(prompts, entries, strict=True):
            answer = {
                "prediction": self.llm.detokenize(entry["ids"], prev_tokens=prompt)
                .decode("utf-8", errors="replace")
                .strip(),
                "generated_tokens": len(entry["ids"]) + entry["stopped"],
                "seconds": seconds,
                "stopped": entry["stopped"],
            }
            if confidence:
                answer["confidence"] = math.exp(entry["log_p"])
            found.append(answer)
        return found

    def _decode(self, tokens: list[tuple[int, int, int, bool]]) -> list[tuple[int, int]]:
        """Decode (sequence, position, token, wants logits) entries in one call; returns (sequence, batch index)
        of each entry whose logits were asked for."""
        batch = self.batch.batch
        batch.n_tokens = len(tokens)
        outputs = []
        for i, (seq, position, token, logits) in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = position
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
            if logits:
                outputs.append((seq, i))
        if tokens:
            self.ctx.decode(self.batch)
        return outputs


class _Draw:
    """One row's sampled tokens: temperature, then the smallest set of tokens holding top_p of the probability
    (as transformers samples), drawn from the row's own seed so a row's answer does not depend on its batch."""

    def __init__(self, sampling: Sampling, seed: int):
        self.temperature, self.top_p = sampling.temperature, sampling.top_p
        self.rng = np.random.default_rng(seed)

    def token(self, logits) -> int:
        scaled = logits.astype(np.float64) / self.temperature
        probabilities = np.exp(scaled - scaled.max())
        probabilities /= probabilities.sum()
        order = np.argsort(-probabilities)
        within = np.cumsum(probabilities[order]) - probabilities[order] < self.top_p  # the first always is
        kept = order[within]
        return int(self.rng.choice(kept, p=probabilities[kept] / probabilities[kept].sum()))


def _common_length(a: list[int], b: list[int]) -> int:
    length = 0
    while length < min(len(a), len(b)) and a[length] == b[length]:
        length += 1
    return length


def _shared_length(prompts: list[list[int]]) -> int:
    """Leading tokens every prompt shares, leaving at least one token of each to decode as its own."""
    shortest = min(len(p) for p in prompts) - 1
    shared = 0
    while shared < shortest and all(p[shared] == prompts[0][shared] for p in prompts):
        shared += 1
    return shared


def gguf_type_name(metadata: dict) -> str | None:
    """The file's type as llama.cpp's tools name it (q4_k_m, q8_0, f16), from its general.file_type."""
    import gguf

    try:
        return (
            gguf.LlamaFileType(int(metadata["general.file_type"]))
            .name.removeprefix("MOSTLY_")
            .removeprefix("ALL_")
            .lower()
        )
    except (KeyError, ValueError):
        return None


def call_in_child(function, *args):
    """Run one of this module's functions in a fresh process (llama.cpp and torch each bring an OpenMP). A child
    that dies (llama.cpp aborts on a file it cannot use) is an error naming the file, never a wait forever."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(function, *args).result()
        except BrokenProcessPool:
            raise PipelineError(
                f"llama.cpp died reading {args[0]} (its messages are above): the file is not one it can run; "
                "the converter's log beside the file says what it wrote"
            ) from None


def inspect_gguf(
    gguf_file: str,
    sequences: list[list[int]],
    prompts: list[dict],
    threads: int,
    gpu: bool,
    lora_file: str | None = None,
) -> dict:
    """What the fidelity checks need from a GGUF file (with lora_file: that LoRA GGUF applied to it), computed in
    its own process: per sequence the top-1 token and the negative log-likelihood of the next token at every
    position; llama.cpp's token ids for each prompt; and the file's end token and chat template."""
    n_ctx = max([len(s) for s in sequences] + [len(p["ids"]) + 64 for p in prompts]) + 8
    llm = open_model(gguf_file, n_ctx, threads, gpu, logits_all=True, lora_file=lora_file)
    top1, nll = [], []
    for ids in sequences:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        top1.append(logits.argmax(axis=1).tolist())
        nll.append((-log_probs[np.arange(len(ids) - 1), ids[1:]]).tolist())
    return {
        "top1": top1,
        "nll": nll,
        "token_ids": [tokenize(llm, Prompt(**p)) for p in prompts],
        "eos_token_id": llm.token_eos(),
        "chat_template": llm.metadata.get("tokenizer.chat_template"),
    }

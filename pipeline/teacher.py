"""The teacher: a large model asked for answers (distill's labels, synthesize's label check and its score on the
gold rows) or for new rows (synthesize), every answer cached.

Answers are appended as they arrive to a jsonl file shared by every run of the recipe (runs/<name>/), keyed by the
teacher, how it was asked (a closed answer set, sampling settings, the answer's length limit), the exact prompt
and, for sampled answers, the row's seed: a killed run continues where it stopped, a rerun with other training
settings asks nothing again, and a changed teacher, prompt or setting asks anew. While one run asks, another run
of the recipe waits on the file's lock and then reads its answers, so nothing is asked twice and no append is lost.

Where a teacher runs: behind an OpenAI-compatible API (teacher.endpoint) through the endpoint runtime, row by
row; answers constrained to a closed set in the transformers runtime (token by token, AnswerTrie); free answers
(sampled rows) in the runtime the evaluation runs the reference in (llama.cpp for a GGUF reference, else
transformers). An API cannot be constrained: its answers outside the set are the caller's to drop or respell
(as_choice), and its confidence is the probability of the tokens it gave (their logprobs, where returned).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import data, llamacpp_install, models, runtimes
from pipeline.errors import PipelineError
from pipeline.files import append_jsonl, read_jsonl_records
from pipeline.logs import log
from pipeline.processes import shared_lock
from pipeline.recipe import DataSection, EvaluateSection, ReferenceSection, reference_runtime
from pipeline.runs import stage_fingerprint
from pipeline.runtimes import Sampling
from pipeline.runtimes import endpoint as endpoint_runtime
from pipeline.runtimes import llamacpp as llamacpp_runtime
from pipeline.runtimes import transformers as transformers_runtime
from pipeline.templates import template_fields


@dataclass(frozen=True)
class Teacher:
    """A teacher as one stage asks it: the recipe's section, the field errors name, the evaluation's settings."""

    section: ReferenceSection
    field: str  # distill.teacher, synthesize.teacher or evaluate.reference
    settings: EvaluateSection  # batch size and threads, as the evaluation runs the reference
    dtype: str  # model.dtype: a local teacher in transformers runs in it
    stage: str  # the stage asking, for its log lines

    def endpoint(self) -> endpoint_runtime.Endpoint | None:
        if self.section.endpoint is None:
            return None
        return endpoint_runtime.Endpoint.from_recipe(self.section, self.field)

    def identity(self) -> str:
        """What the teacher's answers depend on: the API's model, or the local weights' fingerprint."""
        endpoint = self.endpoint()
        if endpoint is not None:
            return endpoint.identity
        return models.resolve_model(self.section.model, f"{self.field}.model").fingerprint


@dataclass(frozen=True)
class Asked:
    answers: list[dict]  # one per row asked, in order: {"key", "prediction", "seconds", ...} as the runtime gave it
    from_cache: int  # of them, answered by an earlier run
    peak_memory_bytes: int | None  # a local teacher's, where it was asked now
    runtime: str  # endpoint, transformers or llama.cpp


def ask(
    teacher: Teacher,
    rows: list[data.TaskRow],
    cache_path: Path,
    max_new_tokens: int,
    answer_set: list[str] | None = None,
    sampling: Sampling | None = None,
    what: str = "asks",
) -> Asked:
    """The teacher's answer to every row (asked with its prompt, system message and chat template), from the
    cache where it was asked before, else asked now: constrained to answer_set where there is one, sampled as
    `sampling` says (each row from its own seed), else greedy."""
    section = teacher.section
    endpoint = teacher.endpoint()
    gguf = None
    if endpoint is not None:
        prompts = endpoint_runtime.prompts_for(rows, endpoint.chat, section.system)
        identity, runtime = endpoint.identity, "endpoint"
    else:
        source = models.resolve_model(section.model, f"{teacher.field}.model")
        tokenizer = models.load_tokenizer(source)
        chat = data.uses_chat_template(tokenizer, section.chat_template)
        prompts = runtimes.prompts_for(tokenizer, rows, chat, section.system)
        identity, runtime = source.fingerprint, "transformers"
        if answer_set is None and reference_runtime(section) == "llamacpp":
            gguf = models.gguf_file(section.model, f"{teacher.field}.model")
            identity, runtime = f"llama.cpp {identity}", "llama.cpp"
    how = [identity, answer_set, max_new_tokens]
    if sampling is not None:
        how.append({"temperature": sampling.temperature, "top_p": sampling.top_p})
    teacher_key = stage_fingerprint(*how)
    seeds = sampling.seeds if sampling is not None else [None] * len(prompts)
    keys = [
        hashlib.sha256((f"{teacher_key}\n{p.text}" + ("" if s is None else f"\nseed {s}")).encode()).hexdigest()[:32]
        for p, s in zip(prompts, seeds, strict=True)
    ]
    # Every run of the recipe shares the answers: while one asks, another waits and then reads its answers.
    with shared_lock(cache_path.with_name(cache_path.name + ".lock"), f"asking {teacher.field}"):
        cached = _read_answers(cache_path)
        missing = [i for i, key in enumerate(keys) if key not in cached]
        log(
            teacher.stage,
            f"teacher {section.model}: {len(missing)} of {len(rows)} {what} ({len(rows) - len(missing)} cached)",
        )

        def keep(entry: dict) -> None:
            record = {"key": keys[entry["row"]], **{k: v for k, v in entry.items() if k != "row"}}
            append_jsonl(cache_path, [record])
            cached[record["key"]] = record

        peak = None
        todo = _first_of_each_key(missing, keys)
        if todo and endpoint is not None:
            client = endpoint_runtime.Client(endpoint)
            client.check()
            endpoint_runtime.ask_all(
                client, prompts, todo, max_new_tokens, keep, logprobs=sampling is None, sampling=sampling
            )
        elif todo:
            job = runtimes.GenerationJob(
                prompts=prompts,
                todo=todo,
                latency_rows=[],
                max_new_tokens=max_new_tokens,
                batch_size=teacher.settings.batch_size,
                threads=teacher.settings.threads or torch.get_num_threads(),
                confidence=sampling is None,
                sampling=sampling,
            )

            def keep_batch(batch: list[dict]) -> None:
                for entry in batch:
                    keep(entry)

            if gguf is not None:
                llamacpp_install.ensure()
                facts = llamacpp_runtime.run(gguf, job, keep_batch, torch.cuda.is_available())
            else:
                trie = AnswerTrie.for_choices(tokenizer, answer_set) if answer_set else None
                facts = transformers_runtime.run(
                    source,
                    None,
                    models.compute_dtype(teacher.dtype),
                    False,
                    tokenizer,
                    job,
                    keep_batch,
                    teacher.stage,
                    allowed_tokens=trie.allowed if trie else None,
                )
            peak = facts["peak_memory_bytes"]
    return Asked([cached[key] for key in keys], len(rows) - len(missing), peak, runtime)


UNLABELLED = "(unlabelled)"  # stands in for the answer the teacher must not see; never part of its prompt


def answer_field(section: DataSection) -> str:
    """The field of an input row the teacher's answer goes into."""
    if section.format == "prompt_completion":
        (field,) = template_fields(section.target)
        return field
    if section.format == "alpaca":
        return "output"
    return section.messages_field


def blank_answer(format: str, value, where: str, field: str):
    if format == "messages":
        if not isinstance(value, list) or not value:
            raise PipelineError(f"{where}: column {field!r} must be a non-empty list of {{role, content}} turns")
        turns = value[:-1] if isinstance(value[-1], dict) and value[-1].get("role") == "assistant" else value
        return [*turns, {"role": "assistant", "content": UNLABELLED}]
    return UNLABELLED


def filled_answer(format: str, value, answer: str):
    if format == "messages":
        turns = value[:-1] if value and value[-1].get("role") == "assistant" else value
        return [*turns, {"role": "assistant", "content": answer}]
    return answer


def _first_of_each_key(todo: list[int], keys: list[str]) -> list[int]:
    """Rows asked the same thing (the same prompt, seed and settings) are asked once."""
    seen: set[str] = set()
    first = []
    for i in todo:
        if keys[i] not in seen:
            seen.add(keys[i])
            first.append(i)
    return first


def _read_answers(path: Path) -> dict[str, dict]:
    """Answers of earlier (maybe killed) runs by key."""
    return {record["key"]: record for record in read_jsonl_records(path) if "key" in record}


def as_choice(answer: str, answer_set: list[str]) -> str | None:
    """The one choice an answer spells loosely (case, surrounding quotes or backticks, a final period), or None."""

    def loose(text: str) -> str:
        return text.strip().strip("`'\".").strip().lower()

    matches = [choice for choice in answer_set if loose(choice) == loose(answer)]
    return matches[0] if len(matches) == 1 else None


def total(values) -> int | None:
    """The sum, or None where any value is unknown (a server that gave no token counts)."""
    values = list(values)
    return None if None in values else sum(values)


class AnswerTrie:
    """The token sequences of a closed answer set, for decoding that can only produce one of them.

    Each answer is tokenized as it follows a prompt, with and without a leading space, and ends with the
    end token; at every step the teacher may only continue some answer's sequence.
    """

    def __init__(self, sequences: list[list[int]], finished: list[int]):
        self.finished = finished  # what a row that has ended may still emit (generate pads finished rows)
        self.root: dict = {}
        for sequence in sequences:
            node = self.root
            for token in sequence:
                node = node.setdefault(token, {})

    @classmethod
    def for_choices(cls, tokenizer, answers: list[str]) -> AnswerTrie:
        end = tokenizer.eos_token_id
        sequences = []
        for answer in answers:
            for text in (answer, " " + answer):
                sequences.append(tokenizer(text, add_special_tokens=False)["input_ids"] + [end])
        return cls(sequences, sorted({end, tokenizer.pad_token_id}))

    def allowed(self, generated: list[int]) -> list[int]:
        node = self.root
        for token in generated:
            node = node.get(token)
            if node is None:  # past the end of an answer
                return self.finished
        return list(node) or self.finished

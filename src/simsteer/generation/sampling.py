"""Sampling K responses per prompt from a (possibly steered) model.

Decoding runs on :mod:`simsteer.generation.torch_engine` (continuous batching, one prefill per prompt);
models it cannot run fall back to static batches through ``model.generate``. Either way
every (prompt, sample) draws from its own random stream (:mod:`simsteer.generation.decoding`), so a
seed gives the same responses for any batch size or split of the prompts, and the
caller's global random state is never touched.

Defaults: top-k 50 with top-p off, since top-p sorts the whole vocabulary every step
(about 25% slower on CPU) while top-k is nearly free.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from ..errors import SimsError
from ..models import LoadedModel
from ..policy import Policy
from ..steering import Steering
from ..tokens import encode_prompt, eos_token_ids, left_pad, pad_token_id
from .decoding import choose_tokens, stream_id, uniforms
from .engines import ENGINES, choose_engine
from .llamacpp import LlamaCppBackend
from .torch_engine import CACHE_BYTES, DecodeSettings, Engine, Job, supports
from .vllm_engine import VllmOptions, vllm_backend


@dataclass(frozen=True)
class SamplingConfig:
    """How responses are drawn.

    Attributes:
        temperature: 0 means greedy decoding.
        top_k: keep the k most likely tokens (0 = off).
        top_p: nucleus threshold (1.0 = off).
        max_new_tokens: response length cap.
        batch_size: sequences decoded together.
        engine: ``"torch"``; ``"llamacpp"`` (a GGUF model with an additive policy,
            :mod:`simsteer.generation.llamacpp`); ``"vllm"`` (:mod:`simsteer.generation.vllm_engine`);
            ``"auto"``: vLLM on CUDA when installed, else llama.cpp when it can, else torch
            (:mod:`simsteer.generation.engines`).
        cache_mb: key/value memory (MiB) the torch engine's batch may hold; long
            prompts decode in fewer rows. It never changes a sample.
        tensor_parallel_size: GPUs one model is split over on vLLM (its own tensor
            parallelism); 1 elsewhere.
        vllm_eager: run vLLM without ``torch.compile`` (a faster start, slower steps).
    """

    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 1.0
    max_new_tokens: int = 48
    batch_size: int = 64
    engine: str = "torch"
    cache_mb: int = CACHE_BYTES >> 20
    tensor_parallel_size: int = 1
    vllm_eager: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise SimsError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise SimsError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SimsError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise SimsError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise SimsError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.tensor_parallel_size < 1:
            raise SimsError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.cache_mb < 1:
            raise SimsError(f"cache_mb must be >= 1, got {self.cache_mb}")
        if self.engine not in ENGINES:
            raise SimsError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def as_greedy(self, **changes: Any) -> SamplingConfig:
        """These settings with greedy decoding (and ``changes``); the engine is kept, so
        the loop's greedy passes (held-out answers, the guard) run where sampling runs."""
        return dataclasses.replace(self, temperature=0.0, **changes)


@dataclass(frozen=True)
class Generation:
    """One sampled response."""

    text: str
    num_tokens: int
    finished: bool  # ended with an end-of-sequence token rather than the length cap


def stream_keys(num_prompts: int, num_samples: int, keys: Sequence[int] | None) -> list[int]:
    """Each prompt's random-stream key (default: its index), checked with the sample count
    (one check for :func:`generate` and the worker pools that split its prompts)."""
    if num_samples < 1:
        raise SimsError(f"the number of samples per prompt must be >= 1, got {num_samples}")
    out = list(range(num_prompts)) if keys is None else [int(k) for k in keys]
    if len(out) != num_prompts:
        raise SimsError(f"{len(out)} stream keys for {num_prompts} prompts")
    return out


def generate(
    lm: LoadedModel,
    prompts: list[str],
    num_samples: int = 1,
    config: SamplingConfig | None = None,
    steering: Steering | Sequence[Steering] | None = None,
    seed: int = 0,
    progress: bool | str = False,
    keys: Sequence[int] | None = None,
) -> list[list[Generation]]:
    """Draw ``num_samples`` responses for each prompt.

    Sample ``s`` of prompt ``i`` draws from the random stream of ``(seed, keys[i], s)``,
    so it is the same for any batch size and any split of the prompts (give each prompt
    the same key in every split).

    Args:
        prompts: user prompts (the chat template is applied here).
        steering: applied during decoding when given (a list is stacked in order).
        seed: the run's seed.
        progress: show a progress bar (a string is used as its label).
        keys: one integer per prompt naming its random streams (default: its index).

    Returns:
        one list of ``num_samples`` generations per prompt, in prompt order.
    """
    config = config or SamplingConfig()
    keys = stream_keys(len(prompts), num_samples, keys)
    tok = lm.tokenizer
    encoded = [encode_prompt(tok, p) for p in prompts]
    jobs = [Job(i, s, stream_id(seed, keys[i], s)) for i in range(len(prompts)) for s in range(num_samples)]
    eos = eos_token_ids(lm.model, tok)
    pad = pad_token_id(tok, eos[0])
    results: list[list[Generation | None]] = [[None] * num_samples for _ in prompts]
    label = progress if isinstance(progress, str) else "sampling"
    bar = tqdm(total=len(jobs), desc=label, unit="seq", disable=not progress, leave=False)
    stack = [steering] if isinstance(steering, Steering) else list(steering or [])
    settings = DecodeSettings(
        config.temperature, config.top_k, config.top_p, config.max_new_tokens, config.batch_size
    )

    def finish(job: Job, tokens: list[int]) -> None:
        results[job.prompt][job.sample] = _to_generation(tok, tokens, eos)
        bar.update(1)

    engine = choose_engine(config.engine, lm, stack)
    with contextlib.ExitStack() as ctx, torch.inference_mode(), bar:
        if engine == "llamacpp":  # the policy runs as llama.cpp's control vector
            backend = ctx.enter_context(LlamaCppBackend.for_model(lm, stack))
            backend.run(encoded, jobs, settings, finish, eos)
        elif engine == "vllm":  # one engine per model, the policy swapped in place
            options = VllmOptions(
                enforce_eager=config.vllm_eager, tensor_parallel_size=config.tensor_parallel_size
            )
            backend = vllm_backend(lm, options)
            backend.set_policy(Policy.of(stack))
            backend.run(encoded, jobs, settings, finish, eos)
        else:
            for s in stack:
                ctx.enter_context(s.applied(lm.model))
            if supports(lm.model):
                Engine(lm.model, eos, pad, cache_bytes=config.cache_mb << 20).run(
                    encoded, jobs, settings, finish
                )
            else:
                _generate_static(lm.model, encoded, jobs, settings, eos, pad, finish)
    return [[g for g in row if g is not None] for row in results]


class _StreamDraws(LogitsProcessor):
    """Makes ``model.generate``'s greedy step pick the token drawn from each row's own
    random stream (the fallback for models the engine does not run)."""

    def __init__(self, rows: list[Job], prompt_width: int, settings: DecodeSettings) -> None:
        self.rows, self.width, self.settings = rows, prompt_width, settings

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.width
        draws = uniforms([j.stream for j in self.rows], [step] * len(self.rows))
        s = self.settings
        chosen = choose_tokens(scores, draws, s.temperature, s.top_k, s.top_p)
        out = torch.full_like(scores, -math.inf)
        return out.scatter_(1, chosen.unsqueeze(1), 0.0)


def _generate_static(model, encoded, jobs, settings: DecodeSettings, eos, pad, finish) -> None:
    """Static batches through ``model.generate`` (longest prompts first)."""
    order = sorted(jobs, key=lambda j: -len(encoded[j.prompt]))
    device = next(model.parameters()).device
    for start in range(0, len(order), settings.batch_size):
        batch = order[start : start + settings.batch_size]
        ids, mask = left_pad([encoded[j.prompt] for j in batch], pad)
        processors = [] if settings.temperature == 0 else [_StreamDraws(batch, ids.shape[1], settings)]
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=settings.max_new_tokens,
            pad_token_id=pad,
            eos_token_id=eos,
            do_sample=False,
            temperature=None,
            top_k=None,
            top_p=None,
            logits_processor=LogitsProcessorList(processors),
        )
        for job, row in zip(batch, out[:, ids.shape[1] :].tolist(), strict=True):
            cut = next((j for j, t in enumerate(row) if t in eos), None)
            finish(job, row if cut is None else row[: cut + 1])


def _to_generation(tokenizer, row: list[int], eos: list[int]) -> Generation:
    cut = next((j for j, t in enumerate(row) if t in eos), None)
    tokens = row if cut is None else row[:cut]
    text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return Generation(text=text, num_tokens=len(tokens) + (cut is not None), finished=cut is not None)

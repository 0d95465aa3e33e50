"""Where the loop's model work runs: in this process (:class:`LocalPool`, the default) or
on Ray actors (:class:`simsteer.workers.ray_pool.RayPool`).

A :class:`WorkerPool` offers the model-heavy operations that the SIMS loop fans out by
prompt shard: sampling, scoring and judging by an oracle, and activation collection.
The loop calls the pool for all of them, so it has one code path whatever runs the work;
the learner's fit, fluency and every run-directory write stay with the caller.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch

from ..activations import PreferenceActivations, collect_preference_activations
from ..generation.sampling import Generation, SamplingConfig, generate
from ..models import LoadedModel, model_digest
from ..oracles import MODEL_ORACLES
from ..oracles.base import Judgment, Oracle, ScoreOracle, finite_scores
from ..steering import Steering

#: torch dtypes -> the names ``load_model`` takes.
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class WorkerSpec:
    """How a worker loads what the driver loaded: the model as ``load_model`` got it, and
    a model-based oracle (reward model, self-judge, self-rank) to build beside it.

    Attributes:
        source: the model id, folder or GGUF file (a local path made absolute).
        dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        device: ``"cpu"``, ``"cuda"``, ...; a ``cuda`` worker takes one GPU.
        trust_remote_code: passed to transformers.
        oracle: the spec (``oracle.describe()``) of a model-based oracle the workers
            build and judge with; ``None``: the oracle stays in the driver.
        threads: torch threads per worker.
        digest: :func:`model_digest` of the driver's model: a worker that loads another
            model from ``source`` (another node's files at that path) is refused when
            the pool starts (empty: not compared).
    """

    source: str
    dtype: str = "fp32"
    device: str = "cpu"
    trust_remote_code: bool = False
    oracle: dict[str, Any] | None = None
    threads: int = 1
    digest: str = ""

    @classmethod
    def of(cls, lm: LoadedModel, oracle: Oracle | None = None, threads: int = 1) -> WorkerSpec:
        """The spec of a model loaded in the driver (and of its oracle, if model-based).

        Args:
            lm: the driver's model.
            oracle: the run's oracle; only a model-based one is built on the workers.
            threads: torch threads per worker.
        """
        source = lm.source
        if Path(source).expanduser().exists():  # workers may start in another folder
            source = str(Path(source).expanduser().resolve())
        return cls(
            source=source,
            dtype=_DTYPE_NAMES.get(lm.dtype, "fp32"),
            device=lm.device.type,
            trust_remote_code=lm.trust_remote_code,
            oracle=oracle.describe() if oracle is not None and is_model_oracle(oracle) else None,
            threads=threads,
            digest=model_digest(lm),
        )


def is_model_oracle(oracle: Oracle) -> bool:
    """True for oracles that hold a model (judged on the workers); judge-API and text
    oracles stay in the driver, where a judge's concurrency limit is shared."""
    name = oracle.describe().get("name", "")
    return name in MODEL_ORACLES or str(name).startswith("reward-model:")


class WorkerPool(ABC):
    """The loop's model work, run somewhere. Use as a context manager (``close`` on exit)."""

    @abstractmethod
    def generate(
        self,
        prompts: list[str],
        num_samples: int = 1,
        config: SamplingConfig | None = None,
        policy: Sequence[Steering] = (),
        seed: int = 0,
        keys: Sequence[int] | None = None,
        progress: bool | str = False,
    ) -> list[list[Generation]]:
        """:func:`simsteer.generation.sampling.generate` of ``policy`` (a stack, empty: unsteered).

        Args:
            prompts, num_samples, config, seed, keys, progress: as for ``generate``;
                prompt i draws from the streams of ``keys[i]`` (default i) wherever it runs.
            policy: the steerings applied, in order.
        """

    @abstractmethod
    def score(self, oracle: ScoreOracle, prompts: list[str], responses: list[str]) -> np.ndarray:
        """``oracle.score`` (on the workers when they hold this oracle), every score finite
        (:func:`~simsteer.oracles.base.finite_scores`: one line naming the oracle)."""

    @abstractmethod
    def judge(self, oracle: Oracle, prompts: list[str], responses: list[list[str]]) -> list[Judgment]:
        """``oracle.judge`` (on the workers when they hold this oracle)."""

    @abstractmethod
    def collect(
        self,
        needs: str,
        prompts: list[str],
        responses: list[str],
        num_positive: int,
        groups: list[int],
        layers: list[int],
        *,
        summary: str = "mean",
        batch_size: int = 16,
        max_response_tokens: int = 32,
        summary_max_tokens: int | None = None,
        progress: bool | str = False,
    ) -> tuple[PreferenceActivations, int]:
        """:func:`simsteer.activations.collect_preference_activations` under the
        unsteered model (same arguments, without the model)."""

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release the workers (a no-op for the local pool)."""

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class LocalPool(WorkerPool):
    """Everything in this process, on ``lm`` (the default pool).

    Example:
        >>> pool = LocalPool(load_model())
        >>> pool.generate(["Hi"], 2, SamplingConfig(max_new_tokens=8), seed=1)
    """

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm

    def generate(
        self,
        prompts: list[str],
        num_samples: int = 1,
        config: SamplingConfig | None = None,
        policy: Sequence[Steering] = (),
        seed: int = 0,
        keys: Sequence[int] | None = None,
        progress: bool | str = False,
    ) -> list[list[Generation]]:
        return generate(self.lm, prompts, num_samples, config, list(policy), seed, progress, keys)

    def score(self, oracle: ScoreOracle, prompts: list[str], responses: list[str]) -> np.ndarray:
        return finite_scores(oracle.name, oracle.score(prompts, responses))

    def judge(self, oracle: Oracle, prompts: list[str], responses: list[list[str]]) -> list[Judgment]:
        return oracle.judge(prompts, responses)

    def collect(
        self,
        needs: str,
        prompts: list[str],
        responses: list[str],
        num_positive: int,
        groups: list[int],
        layers: list[int],
        *,
        summary: str = "mean",
        batch_size: int = 16,
        max_response_tokens: int = 32,
        summary_max_tokens: int | None = None,
        progress: bool | str = False,
    ) -> tuple[PreferenceActivations, int]:
        return collect_preference_activations(
            self.lm,
            needs,
            prompts,
            responses,
            num_positive,
            groups,
            layers,
            summary=summary,
            batch_size=batch_size,
            max_response_tokens=max_response_tokens,
            summary_max_tokens=summary_max_tokens,
            progress=progress,
        )

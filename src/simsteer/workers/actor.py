"""A Ray worker's state: the model (and a model-based oracle), loaded once, and the
operations :class:`simsteer.workers.ray_pool.RayPool` calls on it. Plain Python: Ray
makes it an actor (``ray.remote(...)(ModelWorker)``) when a pool starts."""

from __future__ import annotations

import os
import platform
from typing import Any

import numpy as np
import torch

from ..generation.sampling import Generation, SamplingConfig
from ..oracles.base import Judgment, Oracle, ScoreOracle
from ..steering import Steering
from .payload import load_policy, tensors_to_bytes
from .pool import WorkerSpec, model_digest


class ModelWorker:
    """A Ray actor's state: the model (and a model-based oracle), loaded once."""

    def __init__(self, spec: WorkerSpec) -> None:
        from ..models import load_model

        torch.set_num_threads(spec.threads)
        self.lm = load_model(
            spec.source, device=spec.device, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code
        )
        self.oracle: Oracle | None = None
        if spec.oracle is not None:
            from ..oracles import get_oracle

            self.oracle = get_oracle(spec.oracle, device=spec.device, lm=self.lm)
        self._key: str | None = None
        self._policy: list[Steering] = []
        self._digest = model_digest(self.lm)

    def info(self) -> dict[str, Any]:
        """The process id, the model's sizes and digest (:func:`~.pool.model_digest`),
        the process's node and peak resident memory."""
        import resource

        from ..architecture import num_attention_heads

        return {
            "pid": os.getpid(),
            "node": platform.node(),
            "digest": self._digest,
            "hidden_size": self.lm.hidden_size,
            "num_heads": num_attention_heads(self.lm.model),
            # ru_maxrss is in KiB on Linux
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }

    def _use(self, key: str, boxed: list[Any]) -> list[Steering]:
        if key != self._key:
            import ray

            self._policy = load_policy(ray.get(boxed[0]))  # boxed: not resolved per call
            self._key = key
        return self._policy

    def generate(
        self,
        key: str,
        boxed: list[Any],
        prompts: list[str],
        num_samples: int,
        config: SamplingConfig,
        seed: int,
        keys: list[int],
    ) -> list[list[Generation]]:
        from ..generation.sampling import generate

        return generate(self.lm, prompts, num_samples, config, self._use(key, boxed), seed, False, keys)

    def score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        assert isinstance(self.oracle, ScoreOracle)
        return np.asarray(self.oracle.score(prompts, responses), dtype=np.float64)

    def judge(self, prompts: list[str], responses: list[list[str]]) -> list[Judgment]:
        assert self.oracle is not None
        return self.oracle.judge(prompts, responses)

    def row_lengths(
        self, prompts: list[str], responses: list[str], max_response_tokens: int | None
    ) -> list[int]:
        from ..tokens import encode_pairs

        return [len(r.ids) for r in encode_pairs(self.lm.tokenizer, prompts, responses, max_response_tokens)]

    def collect_batch(
        self,
        kind: str,
        prompts: list[str],
        responses: list[str],
        layers: list[int],
        summary: str,
        max_response_tokens: int | None,
    ) -> bytes:
        """One teacher-forced batch (the rows in batch order) of a collection pass."""
        from ..activations import collect_activations, collect_head_activations, collect_token_activations

        n = len(prompts)
        if kind == "summary":
            acts = collect_activations(
                self.lm, prompts, responses, layers, summary, n, max_response_tokens=max_response_tokens
            )
            assert acts.norm_sum is not None
            meta = {"norm_count": acts.norm_count, "num_tokens": acts.num_tokens}
            return tensors_to_bytes({"summaries": acts.summaries, "norm_sum": acts.norm_sum}, meta)
        if kind == "tokens":
            toks = collect_token_activations(self.lm, prompts, responses, layers, n, max_response_tokens)
            return tensors_to_bytes({str(i): t for i, t in enumerate(toks)})
        heads = collect_head_activations(self.lm, prompts, responses, layers, n)
        return tensors_to_bytes({"heads": heads})

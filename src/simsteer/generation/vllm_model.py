"""What runs inside vLLM's worker: the steering op, the steered architectures and the
worker extension that loads policies into them. Imported only where vLLM is installed
(by :mod:`simsteer.generation.vllm_engine`, and by vLLM's plugin loader in worker
processes through the ``vllm.general_plugins`` entry point :func:`register`).

**The op.** Every decoder layer of a steered architecture ends with one call of the
custom op ``simsteer::steer(hidden, residual, positions, layer)``. vLLM's layers return
``(hidden, residual)`` whose sum is the residual stream (the output of the transformers
layer that simsteer's hooks edit), so the op edits in place ``hidden <- f(hidden +
residual) - residual`` on the tokens a steering applies to. The op is opaque to
``torch.compile``: vLLM compiles the model around it, and its body (plain PyTorch: any
steering function) runs eagerly at every step, reading the worker's
:class:`SteeringTable`. With no steering loaded it returns at once.

**The table** holds slots of loaded policies: slot 0 is the engine's policy (the SIMS
loop's), other slots are the named steerings of a server; a request picks its slot and
its strength multiplier through ``SamplingParams.extra_args`` (:data:`SLOT_ARG`,
:data:`MULTIPLIER_ARG`). Which tokens are prompt or generated comes from the runner's
per-request prompt lengths: the worker extension wraps the runner's ``_model_forward`` to
record, before each forward, every token's request, slot and prompt length.

**Biases.** A policy of constant vectors added at every position (CAA, PCA, ActAdd mean)
goes to the MLP output biases of a model loaded with ``mlp_bias`` (zero biases, written by
:mod:`simsteer.generation.vllm_engine`): :meth:`SteeringWorkerExtension.simsteer_set_biases`
copies the vectors in place, which keeps vLLM's compiled graph and costs nothing per step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..hooks import token_index_set
from ..policy import Policy, PolicyPayload, policy_from_payload

log = logging.getLogger(__name__)

#: ``SamplingParams.extra_args`` keys: the table slot of a request's steering and the
#: multiplier on its saved strength.
SLOT_ARG = "simsteer_slot"
MULTIPLIER_ARG = "simsteer_multiplier"

#: Prefix of the steered architectures' names (``SimsteerLlamaForCausalLM``, ...).
PREFIX = "Simsteer"
#: vLLM classes the op path is built on: (module, class). A family missing here runs on
#: vLLM only unsteered or with biases (when its vLLM model reads ``mlp_bias``).
FAMILIES = (
    ("vllm.model_executor.models.llama", "LlamaForCausalLM"),
    ("vllm.model_executor.models.mistral", "MistralForCausalLM"),
    ("vllm.model_executor.models.qwen2", "Qwen2ForCausalLM"),
    ("vllm.model_executor.models.qwen3", "Qwen3ForCausalLM"),
    ("vllm.model_executor.models.gemma2", "Gemma2ForCausalLM"),
    ("vllm.model_executor.models.gemma3", "Gemma3ForCausalLM"),
    ("vllm.model_executor.models.granite", "GraniteForCausalLM"),
)


@dataclass
class StepTokens:
    """Per token of the running forward: its request's slot, multiplier and prompt length."""

    slot: np.ndarray
    multiplier: np.ndarray
    prompt_length: np.ndarray


@dataclass
class SteeringTable:
    """The policies a worker applies, by slot, and the current step's token map."""

    slots: dict[int, Policy] = field(default_factory=dict)
    step: StepTokens | None = None
    #: request id -> (slot, multiplier), parsed once per request.
    requests: dict[str, tuple[int, float]] = field(default_factory=dict)

    def layers(self) -> set[int]:
        return {i for policy in self.slots.values() for s in policy.steerings for i in s.functions}

    def apply(
        self, hidden: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor, layer: int
    ) -> None:
        """Edit ``hidden`` in place where a loaded steering applies at ``layer``."""
        tokens = hidden.shape[0]
        for slot, policy in self.slots.items():
            for steering in policy.steerings:
                fn = steering.functions.get(layer)
                if fn is None:
                    continue
                for multiplier, rows in self._rows(slot, steering.positions, positions, tokens):
                    scale = float(steering.strength) * multiplier
                    if scale == 0.0:
                        continue
                    index = rows if rows is not None else slice(None)
                    base = residual[index]
                    stream = (hidden[index] + base).unsqueeze(0)
                    with token_index_set(positions[:tokens][index].unsqueeze(0).long()):
                        edited = fn.edit(stream, scale)[0]
                    hidden[index] = edited - base

    def _rows(
        self, slot: int, where: str, positions: torch.Tensor, tokens: int
    ) -> list[tuple[float, torch.Tensor | None]]:
        """(multiplier, token rows) groups of ``slot``'s tokens at ``where`` (``None``:
        every token, multiplier 1: the engine's policy with no step map)."""
        step = self.step
        if step is None:
            return [(1.0, None)] if slot == 0 and where == "all" else []
        pad = max(0, tokens - len(step.slot))  # padded tokens (CUDA graphs) belong to no slot
        slots = np.pad(step.slot[:tokens], (0, pad), constant_values=-1)
        multipliers = np.pad(step.multiplier[:tokens], (0, pad), constant_values=1.0)
        chosen = slots == slot
        if where != "all":
            pos = positions[:tokens].cpu().numpy()
            prompt = np.pad(step.prompt_length[:tokens], (0, pad))
            if where == "prompt":
                chosen &= pos < prompt
            elif where == "generated":
                chosen &= pos >= prompt
            else:  # "last": the last prompt token, then every new one
                chosen &= pos >= prompt - 1
        out = []
        for multiplier in np.unique(multipliers[chosen]):
            rows = np.nonzero(chosen & (multipliers == multiplier))[0]
            out.append((float(multiplier), torch.from_numpy(rows).to(positions.device)))
        return out


#: This process's table (one per vLLM worker process; the op has no other way in).
TABLE = SteeringTable()


@torch.library.custom_op("simsteer::steer", mutates_args=("hidden",))
def steer(hidden: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor, layer: int) -> None:
    """Apply the loaded steerings of ``layer`` to ``hidden`` in place (see the module doc)."""
    if TABLE.slots:
        TABLE.apply(hidden, residual, positions, layer)


@steer.register_fake
def _steer_fake(hidden: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor, layer: int) -> None:
    return None


def _steered_layer(base: type[nn.Module]) -> type[nn.Module]:
    def forward(self, positions, hidden_states, residual, *args, **kwargs):
        hidden_states, residual = base.forward(self, positions, hidden_states, residual, *args, **kwargs)
        torch.ops.simsteer.steer(hidden_states, residual, positions, self.simsteer_layer)
        return hidden_states, residual

    return type(f"{PREFIX}{base.__name__}", (base,), {"forward": forward})


def steered_architecture(base: type[nn.Module]) -> type[nn.Module]:
    """``base`` (a vLLM ``*ForCausalLM``) whose decoder layers end with the steering op."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        for index, layer in enumerate(self.model.layers):
            if hasattr(layer, "forward") and type(layer).__name__ != "PPMissingLayer":
                layer.__class__ = _steered_layer(type(layer))
                layer.simsteer_layer = index

    return type(f"{PREFIX}{base.__name__}", (base,), {"__init__": __init__})


def register() -> None:
    """Register every steered architecture with vLLM (the plugin entry point; idempotent)."""
    from vllm import ModelRegistry

    known = set(ModelRegistry.get_supported_archs())
    for _module, name in FAMILIES:
        if f"{PREFIX}{name}" not in known and name in known:
            ModelRegistry.register_model(f"{PREFIX}{name}", f"{__name__}:{PREFIX}{name}")


def __getattr__(name: str) -> Any:
    """``SimsteerLlamaForCausalLM`` and friends, built on first use (vLLM imports them by name)."""
    for module, base in FAMILIES:
        if name == f"{PREFIX}{base}":
            import importlib

            cls = steered_architecture(getattr(importlib.import_module(module), base))
            globals()[name] = cls
            return cls
    raise AttributeError(name)


def _decoder_layers(model: nn.Module) -> Sequence[nn.Module]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise RuntimeError(f"{type(model).__name__} has no model.layers")
    return layers


class SteeringWorkerExtension:
    """Methods vLLM adds to its worker (``worker_extension_cls``), called through
    ``LLM.collective_rpc``: the policy swaps in place, the model is never reloaded."""

    def simsteer_install(self) -> int:
        """Wrap the runner's forward to record the step's token map; return the layer count."""
        runner = self.model_runner
        if not getattr(runner, "_simsteer_wrapped", False):
            forward = runner._model_forward

            def model_forward(*args, **kwargs):
                TABLE.step = _step_tokens(runner) if TABLE.slots else None
                return forward(*args, **kwargs)

            runner._model_forward = model_forward
            runner._simsteer_wrapped = True
        return len(_decoder_layers(runner.get_model()))

    def simsteer_set_biases(self, vectors: dict[int, torch.Tensor]) -> int:
        """Set every decoder layer's MLP output bias to ``vectors[layer]`` (zero where
        absent), in place; return how many layers hold a non-zero vector."""
        layers = _decoder_layers(self.model_runner.get_model())
        for index, layer in enumerate(layers):
            bias = getattr(getattr(getattr(layer, "mlp", None), "down_proj", None), "bias", None)
            if bias is None:
                if index in vectors:
                    raise RuntimeError(f"layer {index} has no MLP output bias")
                continue
            with torch.no_grad():
                if index in vectors:
                    bias.copy_(vectors[index].to(device=bias.device, dtype=bias.dtype))
                else:
                    bias.zero_()
        return len(vectors)

    def simsteer_set_slot(self, slot: int, payload: PolicyPayload | None) -> int:
        """Load a policy into ``slot`` (``None`` empties it); return the slots loaded."""
        if payload is None:
            TABLE.slots.pop(int(slot), None)
        else:
            device = next(self.model_runner.get_model().parameters()).device
            policy = policy_from_payload(payload)
            for steering in policy.steerings:
                for fn in steering.functions.values():
                    fn.to(device)
            TABLE.slots[int(slot)] = policy
        TABLE.requests.clear()
        return len(TABLE.slots)


def _step_tokens(runner: Any) -> StepTokens:
    """Every scheduled token's slot, multiplier and prompt length, from the runner's batch."""
    batch = runner.input_batch
    count = batch.num_reqs
    starts = runner.query_start_loc.np[: count + 1]
    per_request = np.diff(starts)
    slots = np.zeros(count, dtype=np.int64)
    multipliers = np.ones(count, dtype=np.float64)
    for row, request_id in enumerate(batch.req_ids[:count]):
        known = TABLE.requests.get(request_id)
        if known is None:
            state = runner.requests.get(request_id)
            extra = (
                (getattr(getattr(state, "sampling_params", None), "extra_args", None) or {}) if state else {}
            )
            known = (int(extra.get(SLOT_ARG, 0)), float(extra.get(MULTIPLIER_ARG, 1.0)))
            TABLE.requests[request_id] = known
        slots[row], multipliers[row] = known
    if len(TABLE.requests) > 4096:  # finished requests are never told apart: keep it small
        live = set(batch.req_ids[:count])
        TABLE.requests = {k: v for k, v in TABLE.requests.items() if k in live}
    owner = np.repeat(np.arange(count), per_request)
    return StepTokens(
        slot=slots[owner],
        multiplier=multipliers[owner],
        prompt_length=np.asarray(batch.num_prompt_tokens[:count])[owner],
    )

"""A steered model inside lm-evaluation-harness: the ``simsteer`` model adapter.

Importing this module registers the model name ``simsteer`` in the harness's model
registry, so that ``lm_eval.simple_evaluate(model="simsteer", model_args=...)`` scores a
steered model on any harness task. The harness's own ``lm_eval`` command (0.4.13) only
knows the models of its source tree, so the command line goes through this module,
which registers the adapter and then hands its arguments to the harness's CLI unchanged::

    python -m simsteer.integrations.lm_eval --model simsteer \\
        --model_args steering=runs/sims --tasks arc_easy --device cpu

``model_args``: ``pretrained`` (what :func:`simsteer.models.load_model` takes; default the
embedded model), ``steering`` (a run directory or a steering / policy folder; none for
the unsteered model), ``strength`` (a multiplier on the saved strength), ``dtype``,
``batch_size``, ``max_length``, ``trust_remote_code``, ``seed``.

Scoring is :mod:`simsteer.evaluation.mc`'s: the harness splits each (context,
continuation) into tokens the same way, the rows are right-padded, and the steering is
applied around each forward with ``prompt_end`` where the continuation starts (so a
steering's ``prompt`` / ``generated`` positions mean context / continuation). Generation
runs on the continuous-batching :class:`~simsteer.generation.torch_engine.Engine` with the policy attached,
greedy unless a task asks for sampling; the harness's contexts are used as given (its
``--apply_chat_template`` decides the chat format, not this adapter).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from ..errors import SimsError
from ..generation.decoding import stream_id
from ..generation.torch_engine import DecodeSettings, Engine, Job, supports
from ..loop.rundir import RunDir
from ..models import LoadedModel, load_model
from ..policy import Policy
from ..tokens import ForwardBatch, TokenRow, eos_token_ids, pad_token_id, response_logits, teacher_forced

try:
    import lm_eval.models  # noqa: F401  (the harness's own names, see register())
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import model_registry
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as exc:  # an optional extra: say how to get it
    raise SimsError(
        f"the lm-evaluation-harness adapter needs lm-eval ({exc.name} missing): "
        "pip install 'simsteer[lmeval]'"
    ) from None

__all__ = ["MODEL_NAME", "SimsteerLM", "load_steering", "main", "register"]

log = logging.getLogger(__name__)

#: The name of the adapter in the harness's model registry (``--model simsteer``).
MODEL_NAME = "simsteer"
_TARGET = "simsteer.integrations.lm_eval:SimsteerLM"
_DEFAULT_MAX_GEN = 256  # the harness's own default for max_gen_toks


def register() -> None:
    """Register ``simsteer`` in lm-eval's model registry (idempotent; done on import).

    The entry is the lazy ``"module:Class"`` form, so that the module run as
    ``python -m`` and the module imported by name register the same thing.
    """
    # lm_eval.models (imported above) registers the harness's own models first: its
    # get_model() only imports them while the registry is empty, so an adapter
    # registered alone would hide "hf" and the rest.
    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=_TARGET)


def load_steering(path: str | Path | None, strength: float | None = None) -> Policy:
    """The policy that ``steering=`` names: a run directory's ``final/``, or a steering or
    policy folder; ``None`` or ``""`` for the unsteered model.

    Args:
        path: the run directory or folder.
        strength: multiplier on the saved strength (``None``: as saved).
    """
    if path is None or str(path) == "":
        policy = Policy()
    else:
        folder = Path(path)
        if not folder.exists():
            raise SimsError(f"steering not found: {folder} (give a run directory or a steering folder)")
        run = RunDir(folder)
        if run.is_run():
            if not run.final.exists():
                raise SimsError(
                    f"{folder} has no final policy yet: finish it with `sims run --resume {folder}`"
                )
            folder = run.final
        policy = Policy.load(folder)
    return policy if strength is None else policy.scaled(float(strength))


def _batch_size(value: int | str | None) -> int:
    # The harness passes "auto" / "auto:N" through; a fixed size is what we do.
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return 16
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise SimsError(f"batch_size must be a positive integer or 'auto', got {value!r}") from None
    if size < 1:
        raise SimsError(f"batch_size must be a positive integer or 'auto', got {value!r}")
    return size


def _device(value: str | None) -> str | None:
    # The harness's CLI asks for cuda:0 by default, also on machines without one.
    if value and str(value).startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s is not available; using the default device", value)
        return None
    return value or None


class SimsteerLM(TemplateLM):
    """An lm-eval model: a simsteer-loaded causal LM with a steering policy applied.

    Args:
        pretrained: a Hugging Face id, local folder or ``.gguf`` file; ``None`` (default)
            for the embedded model.
        steering: a run directory or a steering / policy folder; ``None`` for the
            unsteered model.
        strength: multiplier on the saved strength.
        dtype: ``auto``, ``bf16``, ``fp16`` or ``fp32``.
        device: ``cpu``, ``cuda``, ...; the best available by default.
        batch_size: rows per forward and sequences decoded together (``auto``: 16).
        max_length: longest row; longer contexts lose tokens from the left (default the
            model's ``max_position_embeddings``, else 2048).
        trust_remote_code: passed to transformers.
        seed: the random streams of sampled generations (greedy ones use none).
        lm / policy: an already loaded model and policy (Python API; they replace
            ``pretrained`` / ``steering``).

    Example:
        >>> import lm_eval, simsteer.integrations.lm_eval  # registers "simsteer"
        >>> lm_eval.simple_evaluate(model="simsteer", model_args="steering=runs/sims",
        ...                         tasks=["arc_easy"], device="cpu")
    """

    def __init__(
        self,
        pretrained: str | None = None,
        steering: str | None = None,
        strength: float | None = None,
        dtype: str = "auto",
        device: str | None = None,
        batch_size: int | str | None = 16,
        max_length: int | None = None,
        trust_remote_code: bool = False,
        seed: int = 0,
        lm: LoadedModel | None = None,
        policy: Policy | None = None,
        max_batch_size: int | None = None,  # given by the harness; sizes are fixed here
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            known = "pretrained, steering, strength, dtype, batch_size, max_length, trust_remote_code, seed"
            raise SimsError(f"unknown simsteer model_args: {', '.join(sorted(unknown))} (known: {known})")
        # The steering is read before the model is loaded: a wrong path fails at once.
        self.policy = policy if policy is not None else load_steering(steering, strength)
        if policy is not None and strength is not None:
            self.policy = policy.scaled(float(strength))
        self.lm = lm or load_model(
            pretrained, device=_device(device), dtype=dtype, trust_remote_code=bool(trust_remote_code)
        )
        self.policy.check_model(self.lm.model)
        self.tokenizer = self.lm.tokenizer
        self.batch_size = _batch_size(batch_size)
        config_max = getattr(self.lm.model.config, "max_position_embeddings", None)
        self.max_length = int(max_length or config_max or 2048)
        self.seed = int(seed)
        self._device = self.lm.device
        self._source = self.lm.source if pretrained is None else str(pretrained)
        self._steering = None if steering is None else str(steering)

    # -- tokens ---------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        # What an empty context is conditioned on: BOS where the model has one.
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string``; special tokens as the tokenizer adds them by default
        (as ``sims eval`` encodes), unless ``add_special_tokens`` says otherwise."""
        if add_special_tokens is None:
            return list(self.tokenizer(string)["input_ids"])
        return list(self.tokenizer(string, add_special_tokens=add_special_tokens)["input_ids"])

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", self._source)).replace("/", "__")

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The harness's ``--apply_chat_template``: the model's own chat template."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise SimsError(f"{self._source} has no chat template (drop --apply_chat_template)")
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def get_model_info(self) -> dict[str, Any]:
        """What the harness writes into its results' config."""
        return {
            "model_source": self._source,
            "steering": self._steering,
            "steering_layers": sorted({i for s in self.policy for i in s.layers}),
            "steering_strengths": [s.strength for s in self.policy],
        }

    # -- log-likelihoods --------------------------------------------------------------
    def _steered(self, batch: ForwardBatch) -> AbstractContextManager[None]:
        # prompt / generated positions mean context / continuation here, as in sims eval.
        return self.policy.applied(self.lm.model, prompt_end=batch.response_start)

    def _score_rows(self, rows: Sequence[TokenRow]) -> list[tuple[float, bool]]:
        """(sum of the response's log-probabilities, whether greedy decoding gives it)."""
        out: list[tuple[float, bool]] = [(float("nan"), False)] * len(rows)
        with torch.inference_mode():
            for batch in teacher_forced(self.lm, rows, self.batch_size, padding="right", hooks=self._steered):
                for row, i in enumerate(batch.index):
                    logits, target = response_logits(self.lm, batch, row)
                    logp = torch.log_softmax(logits, dim=-1)
                    total = float(logp.gather(1, target.view(-1, 1)).sum())
                    out[i] = (total, bool((logp.argmax(dim=-1) == target).all()))
        return out

    def _row(self, context: list[int], continuation: list[int]) -> TokenRow:
        ids = (context + continuation)[-self.max_length :]
        return TokenRow(ids, min(len(continuation), len(ids) - 1))

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        results = self._score_rows([self._row(ctx, cont) for _, ctx, cont in requests])
        for (pair, _, _), result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in windows of ``max_length`` tokens (each token
        predicted once, the first one after the prefix token)."""
        rows, owner = [], []
        for n, request in enumerate(requests):
            (text,) = request.args
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text, add_special_tokens=False),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(make_disjoint_window, windows):
                rows.append(TokenRow(context + continuation, len(continuation)))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (value, _) in zip(owner, self._score_rows(rows), strict=True):
            totals[n] += value
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # -- generation -------------------------------------------------------------------
    def _settings(self, kwargs: dict[str, Any]) -> DecodeSettings:
        sample = bool(kwargs.get("do_sample", False)) and float(kwargs.get("temperature", 1.0) or 0) > 0
        return DecodeSettings(
            temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
            top_k=int(kwargs.get("top_k", 0) or 0) if sample else 0,
            top_p=float(kwargs.get("top_p", 1.0) or 1.0) if sample else 1.0,
            max_new_tokens=int(kwargs.get("max_gen_toks", _DEFAULT_MAX_GEN)),
            batch_size=self.batch_size,
        )

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continue each context until one of its ``until`` strings (cut off) or
        ``max_gen_toks`` tokens; greedy unless the task sets ``do_sample``."""
        prompts: list[list[int]] = []
        jobs: list[Job] = []
        stops: list[list[str]] = []
        for n, request in enumerate(requests):
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            stops.append([until] if isinstance(until, str) else list(until))
            settings = self._settings(kwargs)
            # Keep room for the answer: the context loses tokens from the left.
            keep = max(self.max_length - settings.max_new_tokens, 1)
            prompts.append(self.tok_encode(context)[-keep:])
            jobs.append(Job(n, 0, stream_id(self.seed, n, 0), settings=settings))
        texts = [""] * len(requests)
        tok = self.tokenizer
        eos = eos_token_ids(self.lm.model, tok)

        def cut(n: int, tokens: list[int]) -> tuple[str, bool]:
            text = tok.decode([t for t in tokens if t not in eos], skip_special_tokens=True)
            hits = [text.index(s) for s in stops[n] if s and s in text]
            return (text[: min(hits)], True) if hits else (text, False)

        def on_token(job: Job, tokens: list[int]) -> bool:
            return not cut(job.prompt, tokens)[1]  # False ends the row at a stop string

        def on_finish(job: Job, tokens: list[int]) -> None:
            texts[job.prompt] = cut(job.prompt, tokens)[0]

        if jobs:
            run = DecodeSettings(0.0, 0, 1.0, max(j.settings.max_new_tokens for j in jobs), self.batch_size)
            if not supports(self.lm.model):
                raise SimsError(
                    f"generation needs a model the simsteer engine runs; {self._source} is not one"
                )
            with torch.inference_mode(), self.policy.applied(self.lm.model):
                Engine(self.lm.model, eos, pad_token_id(tok, eos[0])).run(
                    prompts, jobs, run, on_finish, on_token=on_token
                )
        for request, text in zip(requests, texts, strict=True):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m simsteer.integrations.lm_eval ARGS``: the harness's own command line
    (``lm_eval ARGS``) with the ``simsteer`` model registered.

    Args:
        argv: the harness's arguments (default: this process's).
    """
    register()
    from lm_eval.__main__ import cli_evaluate

    # The harness's CLI reads sys.argv itself.
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except SimsError as exc:
        print(f"lm-eval: error: {exc}", file=sys.stderr)
        return 2
    return 0


register()

if __name__ == "__main__":
    sys.exit(main())

"""BiPO, bi-directional preference optimisation of a steering vector (Cao et al., NeurIPS
2024, "Personalized Steering of Large Language Models").

A vector ``v`` per chosen layer, added to the layer's output (``h <- h + v``), is
optimised directly on the D+/D- pairs with a DPO objective whose policy is the *frozen*
model steered by ``v`` and whose reference is the same model unsteered. Both directions
train the one vector: ``+v`` should make the preferred response ``y+`` more likely
relative to the dispreferred ``y-`` than the unsteered model does, and ``-v`` the reverse:

    m(s) = [log p_{s v}(y+) - log p_0(y+)] - [log p_{s v}(y-) - log p_0(y-)]
    loss = mean over pairs of  1/2 [ -log sigmoid(beta m(+1)) - log sigmoid(-beta m(-1)) ]

(log-probabilities summed over the response tokens, each cut to ``max_response_tokens``).
The paper draws the direction ``d ∈ {-1, +1}`` at random per step; averaging both
terms is that objective's expectation, without the sampling noise. The result is an
:class:`~simsteer.functions.AddVector` per layer, so it saves, composes and exports
(GGUF control vectors) like CAA.

Scale (documented choice): the vector is trained in units of the layer's mean token norm
``n`` (from the collected summaries, as CAA's): ``v = n / sqrt(d) * w``, ``w`` starting
at zero (the paper's start). Adam moves each entry of ``w`` by about ``lr`` per step, so
one step changes ``|v|`` by at most about ``lr * n`` whatever the model's width, and one
``lr`` suits every model. After each step ``|v|`` is capped at ``max_norm * n``: the DPO
objective rewards an ever larger margin and never asks for fluency, so without a cap the
norm only grows with the number of steps. Strength 1 is the vector as trained; the
loop's fluency guard then scans multipliers at or below it (as for CAA's coefficient).

Data: pairs are (y+, y-) of the same prompt (the Cartesian product within each prompt,
a seeded random subset of at most ``max_pairs``); when no prompt has both, each
positive is paired with a negative of another prompt (each scored under its own prompt).
The learner needs the texts and the model (``needs = "texts"``; the loop hands the model
over with :meth:`BiPO.prepare`).

Positions: the vector is trained where it will be applied: ``all`` / ``prompt`` /
``generated`` as in :mod:`simsteer.hooks`; ``last`` (during generation: the last prompt
token, then each new token) is trained at the last prompt token and the response tokens,
which is what ``last`` steers when the response is generated.

Cost: unlike the closed-form learners BiPO runs the model. The reference pass runs 2
sequences per pair once; each Adam step runs 4 per pair (y+ and y- under +v and -v)
forward, and back through the layers from the steered one up (the model's weights need
no gradients). The defaults (at most 32 pairs, 2 epochs) make 256 steered sequences of at
most 32 response tokens per fit.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..architecture import decoder_module
from ..errors import SimsError
from ..functions import AddVector, SteeringFunction
from ..hooks import steer
from ..models import LoadedModel
from ..steering import Steering
from ..tokens import LogitHead, TokenRow, encode_pairs, pad_sequences, pad_token_id
from .base import Learner, LearnerConfig, PreferenceActivations, register_learner

__all__ = ["BiPO", "BiPOConfig", "preference_pairs", "response_logprobs", "train_bipo"]

#: One preference pair: the (prompt, response) texts of y+ and of y-.
Pair = tuple[tuple[str, str], tuple[str, str]]


@dataclass(frozen=True)
class BiPOConfig(LearnerConfig):
    """BiPO options.

    Attributes:
        beta: DPO temperature β (the paper's 0.1).
        lr: Adam step, in units of the layer's mean token norm (see the module docstring).
        epochs: passes over the pairs.
        batch_size: pairs per Adam step (each step runs 4 sequences per pair).
        max_pairs: cap on the pairs trained on (a seeded random subset).
        max_response_tokens: response tokens scored per response (longer ones are cut).
        max_norm: cap on ``|v|`` as a fraction of the layer's mean token norm.
        single_layer: train one vector at the center of ``layers`` (the paper's single
            layer; by default the model's middle layer); false trains one per layer,
            jointly.
        seed: pair subset and order.
    """

    beta: float = 0.1
    lr: float = 0.01
    epochs: int = 2
    batch_size: int = 4
    max_pairs: int = 32
    max_response_tokens: int = 32
    max_norm: float = 0.5
    single_layer: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("beta", "lr", "max_norm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise SimsError(f"BiPO needs a finite {name} > 0, got {value!r}")
        for name in ("epochs", "batch_size", "max_pairs", "max_response_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SimsError(f"BiPO needs an integer {name} >= 1, got {value!r}")


def preference_pairs(data: PreferenceActivations, max_pairs: int, seed: int = 0) -> tuple[list[Pair], bool]:
    """The (y+, y-) pairs BiPO trains on, and whether they share their prompt.

    Within each prompt every D+ response meets every D- one; with no prompt holding both,
    positive ``i`` meets negative ``i mod n-`` (each keeps its own prompt). At most
    ``max_pairs`` of them, a random subset drawn with ``seed``, in a stable order.

    Raises:
        SimsError: without texts, or without a positive and a negative response.
    """
    pos, neg = data.positive_texts, data.negative_texts
    if pos is None or neg is None:
        raise SimsError('BiPO needs the (prompt, response) texts: collect with needs="texts"')
    if not pos or not neg:
        raise SimsError("BiPO needs at least one positive and one negative response")
    pairs = [
        (pos[i], neg[j])
        for i, j in itertools.product(range(len(pos)), range(len(neg)))
        if data.positive_groups[i] == data.negative_groups[j]
    ]
    paired = bool(pairs)
    if not paired:
        pairs = [(p, neg[i % len(neg)]) for i, p in enumerate(pos)]
    if len(pairs) > max_pairs:
        keep = sorted(random.Random(seed).sample(range(len(pairs)), max_pairs))
        pairs = [pairs[i] for i in keep]
    return pairs, paired


def response_logprobs(
    lm: LoadedModel,
    rows: list[TokenRow],
    vectors: dict[int, torch.Tensor] | None = None,
    signs: torch.Tensor | None = None,
    positions: str = "all",
) -> torch.Tensor:
    """``[len(rows)]`` summed log-probabilities of each row's response tokens, with
    ``signs[i] * vectors[layer]`` added to row ``i``'s output of each layer (unsteered
    without ``vectors``). Differentiable in ``vectors``; the LM head runs on the response
    positions only.

    Args:
        rows: token rows (:func:`~simsteer.tokens.encode_pairs`); one forward for all.
        vectors: layer -> ``[d]`` vector added there.
        signs: ``[len(rows)]`` per-row multiplier of the vectors (default all +1).
        positions: where the vectors are added (see the module docstring for ``last``).

    Example:
        >>> rows = encode_pairs(lm.tokenizer, ["Hi"], ["Hello there"])
        >>> response_logprobs(lm, rows, {6: v})
    """
    device = lm.device
    ids, mask = pad_sequences([r.ids for r in rows], pad_token_id(lm.tokenizer), "left")
    width = ids.shape[1]
    start = width - torch.tensor([r.response_len for r in rows])  # first response position
    context: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if vectors:
        s = (torch.ones(len(rows)) if signs is None else signs).to(device).view(-1, 1, 1)
        edits = {layer: (lambda h, v=v: h + (s * v).to(h.dtype)) for layer, v in vectors.items()}
        # "last" steers the last prompt token and every generated one: "generated" from
        # one position earlier.
        where, end = ("generated", start - 1) if positions == "last" else (positions, start)
        context = steer(lm.model, edits, where, prompt_end=end)
    with context:
        out = decoder_module(lm.model)(
            input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False
        )
    # Position p predicts token p + 1: the response is predicted from start - 1 on.
    predicting = torch.arange(width - 1).view(1, -1) >= (start - 1).view(-1, 1)
    hidden = out.last_hidden_state[:, :-1][predicting.to(device)]
    logits = LogitHead(lm.model)(hidden, float32=True)
    target = ids[:, 1:][predicting].to(device)
    token_lp = logits.gather(1, target.view(-1, 1)).squeeze(1) - logits.logsumexp(-1)
    row = torch.arange(len(rows)).view(-1, 1).expand_as(predicting)[predicting].to(device)
    return torch.zeros(len(rows), device=device).index_add(0, row, token_lp)


@contextlib.contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """Gradients for nothing but the steering vectors; eval mode; restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def train_bipo(
    lm: LoadedModel, pairs: list[Pair], norms: dict[int, float], config: BiPOConfig
) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """Optimise one vector per layer of ``norms`` on ``pairs`` (see the module docstring).

    Args:
        lm: the model, frozen during training.
        pairs: (y+, y-) texts (:func:`preference_pairs`).
        norms: layer -> the layer's mean token norm (the scale of ``lr`` and ``max_norm``).
        config: the options (``beta``, ``lr``, ``epochs``, ...).

    Returns:
        layer -> float32 vector on the CPU, and facts about the fit (loss per epoch, ...).
    """
    cap = config.max_response_tokens
    pos_rows = encode_pairs(lm.tokenizer, [p[0][0] for p in pairs], [p[0][1] for p in pairs], cap)
    neg_rows = encode_pairs(lm.tokenizer, [p[1][0] for p in pairs], [p[1][1] for p in pairs], cap)
    if not any(r.response_len for r in pos_rows + neg_rows):
        raise SimsError("BiPO needs responses with at least one token")
    d, device, b = lm.hidden_size, lm.device, config.batch_size
    scales = {layer: n / math.sqrt(d) for layer, n in norms.items()}
    with _frozen(lm.model):
        with torch.no_grad():  # the reference: the unsteered model, once
            ref_pos, ref_neg = (
                torch.cat([response_logprobs(lm, rows[i : i + 4 * b]) for i in range(0, len(rows), 4 * b)])
                for rows in (pos_rows, neg_rows)
            )
        w = {layer: torch.zeros(d, device=device, requires_grad=True) for layer in norms}
        optimizer = torch.optim.Adam(list(w.values()), lr=config.lr)
        rng = random.Random(config.seed)
        order = list(range(len(pairs)))
        losses: list[float] = []
        for _ in range(config.epochs):
            rng.shuffle(order)
            total = 0.0
            for i in range(0, len(order), b):
                idx = order[i : i + b]
                n = len(idx)
                rows = [pos_rows[j] for j in idx] + [neg_rows[j] for j in idx]
                signs = torch.tensor([1.0] * (2 * n) + [-1.0] * (2 * n))
                lp = response_logprobs(
                    lm, rows + rows, {k: scales[k] * w[k] for k in w}, signs, config.positions
                )
                rp, rn = ref_pos[idx], ref_neg[idx]
                plus = (lp[:n] - rp) - (lp[n : 2 * n] - rn)  # +v: y+ over y- gains
                minus = (lp[3 * n :] - rn) - (lp[2 * n : 3 * n] - rp)  # -v: y- over y+ gains
                loss = 0.5 * (F.softplus(-config.beta * plus) + F.softplus(-config.beta * minus)).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                with torch.no_grad():  # |v| <= max_norm x the layer's token norm
                    for wk in w.values():
                        wk.mul_(min(1.0, config.max_norm * math.sqrt(d) / max(float(wk.norm()), 1e-12)))
                total += float(loss.detach()) * n
            losses.append(total / len(pairs))
    vectors = {k: (scales[k] * w[k]).detach().float().cpu() for k in w}
    facts = {
        "pairs": len(pairs),
        "steps": config.epochs * math.ceil(len(pairs) / b),
        "loss": [round(x, 6) for x in losses],
        "relative_norm": {str(k): round(float(v.norm()) / norms[k], 6) for k, v in vectors.items()},
    }
    return vectors, facts


@register_learner
class BiPO(Learner):
    """Bi-directional preference optimisation of a steering vector; needs the texts and
    the model (``needs = "texts"``, :meth:`prepare`)."""

    name = "bipo"
    config_class = BiPOConfig
    needs = "texts"

    def __init__(self, config: LearnerConfig | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self._lm: LoadedModel | None = None

    def prepare(self, lm: LoadedModel) -> None:
        self._lm = lm

    def fit(self, data: PreferenceActivations, fingerprint: dict[str, Any]) -> Steering:
        cfg: BiPOConfig = self.config  # type: ignore[assignment]
        if self._lm is None:
            raise SimsError("BiPO needs the model: call learner.prepare(lm) first")
        pairs, paired = preference_pairs(data, cfg.max_pairs, cfg.seed)
        chosen = data.layers[len(data.layers) // 2 :][:1] if cfg.single_layer else data.layers
        norms = {layer: float(data.token_norms[data.layers.index(layer)]) for layer in chosen}
        bad = [layer for layer, n in norms.items() if not (math.isfinite(n) and n > 0)]
        if bad:
            raise SimsError(f"BiPO needs a positive token norm at layer {bad[0]} (from the summaries)")
        vectors, facts = train_bipo(self._lm, pairs, norms, cfg)
        functions: dict[int, SteeringFunction] = {layer: AddVector(v) for layer, v in vectors.items()}
        return self.steering(
            functions,
            fingerprint,
            metadata={**facts, "paired": paired},
        )

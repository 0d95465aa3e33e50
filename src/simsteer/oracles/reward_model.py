"""A Hugging Face sequence-classification reward model as an oracle.

The (prompt, response) pair is written with the reward model's chat template when it has
one, else as ``prompt\\n\\nresponse``. With one output label the score is that logit; with
two, the log-odds of label 1 over label 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import SimsError
from .base import ScoreOracle
from .registry import register_oracle


class RewardModelOracle(ScoreOracle):
    def __init__(
        self,
        name_or_path: str,
        device: str | torch.device | None = None,
        batch_size: int = 8,
        max_length: int = 1024,
        temperature: float = 1.0,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__(temperature)
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from ..models import downloads_allowed, hub_cached, no_download_message

        local = Path(name_or_path).is_dir()
        offline = local or not downloads_allowed()
        if not local and offline and not hub_cached(name_or_path):
            raise SimsError(no_download_message(f"reward model {name_or_path!r}"))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                name_or_path, local_files_only=offline, trust_remote_code=trust_remote_code
            )
            self.model = AutoModelForSequenceClassification.from_pretrained(
                name_or_path, local_files_only=offline, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SimsError(f"cannot load reward model {name_or_path!r}: {first}") from None
        labels = self.model.config.num_labels
        if labels not in (1, 2):
            raise SimsError(f"reward model {name_or_path!r} has {labels} labels; 1 or 2 are supported")
        if device is not None:
            self.model.to(device)
        self.model.eval().requires_grad_(False)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.name = f"reward-model:{name_or_path}"
        self.batch_size = batch_size
        self.max_length = max_length

    def _text(self, prompt: str, response: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                tokenize=False,
            )
        return f"{prompt}\n\n{response}"

    def score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        texts = [self._text(p, r) for p, r in zip(prompts, responses, strict=True)]
        device = next(self.model.parameters()).device
        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    texts[start : start + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    add_special_tokens=not getattr(self.tokenizer, "chat_template", None),
                ).to(device)
                logits = self.model(**enc).logits.float()
                if logits.shape[-1] == 1:
                    s = logits[:, 0]
                else:
                    s = logits[:, 1] - logits[:, 0]
                scores.extend(s.cpu().tolist())
        return np.asarray(scores, dtype=np.float64)


def _local_path(path: str) -> str:
    """A path that exists here is made absolute; anything else (a hub id) is kept."""
    return str(Path(path).expanduser().resolve()) if Path(path).expanduser().exists() else path


def _name_spec(name: str, options: dict[str, Any]) -> dict[str, Any]:
    arg = name.partition(":")[2]
    if not arg:
        raise SimsError("reward-model needs a model: use reward-model:PATH_OR_ID")
    return {"name": f"reward-model:{_local_path(arg)}"}


@register_oracle("reward-model", names=("reward-model:PATH",), aliases=("rm",), name_spec=_name_spec)
def _build(name: str, settings: dict[str, Any], device: str | None, lm: Any) -> RewardModelOracle:
    return RewardModelOracle(name.partition(":")[2], device=device, **settings)

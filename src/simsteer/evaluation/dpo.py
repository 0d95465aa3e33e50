"""The DPO baseline: a LoRA adapter fine-tuned with DPO on the run's own preference pairs.

SIMS spends its oracle budget on judging the policy's samples; DPO at the *same* budget
trains on exactly those judgments (:func:`~.dpo_pairs.run_pairs`), so the comparison
is steering vs fine-tuning on equal evidence. Training uses TRL's ``DPOTrainer`` with a
peft LoRA adapter (the optional extra ``simsteer[baselines]``, imported only here and
only when used); the reference model is the frozen base (the adapter switched off).

What a ``dpo`` baseline folder holds (besides ``config.json`` and ``eval_prompts.jsonl``
like every baseline, :mod:`.baselines`)::

    OUT/adapter/adapter_config.json        peft's LoRA settings (JSON)
    OUT/adapter/adapter_model.safetensors  the LoRA weights (safetensors, never a pickle)
    OUT/dpo_pairs.jsonl                    the pairs trained on, in training order

``config.json`` records the settings, the pairs, the tokens trained on, the seconds and
the adapter's size. Nothing the trainer would pickle (``training_args.bin``,
optimizer state) is written: the trainer works in a temporary folder that is deleted.
``sims eval`` answers with the adapter merged into the base weights
(:func:`load_dpo_model`).
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import SimsError
from ..io import new_file_mode, staged_dir, write_jsonl
from ..models import LoadedModel, load_model, parse_layers
from .dpo_pairs import DPOPair, encode_dpo_pairs, end_token_id
from .mc import evaluate_mc

#: The adapter's folder inside a ``dpo`` baseline folder, and peft's file names in it.
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PAIRS_FILE = "dpo_pairs.jsonl"

INSTALL_HINT = "pip install 'simsteer[baselines]'"


@dataclass(frozen=True)
class DPOBaselineConfig:
    """How the DPO baseline trains (small CPU defaults; every field is a CLI option).

    Attributes:
        beta: DPO's beta (how far from the reference model the policy may move).
        learning_rate: AdamW's learning rate for the LoRA weights (high for LoRA because a
            run labels only a few hundred pairs: one epoch is a few dozen steps).
        epochs: passes over the pairs.
        batch_size: pairs per optimiser step.
        lora_r: LoRA rank.
        lora_alpha: LoRA scale numerator (the update is scaled by alpha / r).
        lora_dropout: dropout on the LoRA input.
        target_modules: module names that get an adapter (``None``: peft's default for
            the architecture, the attention query and value projections for Llama).
        lora_layers: decoder layers that get an adapter, as ``--layers`` takes them
            (``"all"``, ``"9-20"``, ``"3,5"``; ``None``: all). Fewer, later layers train
            faster: the backward pass stops below the lowest adapted layer.
        max_pairs: train on at most this many pairs, evenly spaced (``None``: all).
        max_length: cut each prompt + answer to this many tokens.
        device: where to train (``"cpu"`` by default; the weights are fp32).
        seed: seeds the adapter's initialisation and the data order.
    """

    beta: float = 0.1
    learning_rate: float = 5e-4
    epochs: int = 1
    batch_size: int = 4
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    lora_layers: str | None = None
    max_pairs: int | None = None
    max_length: int = 512
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "lora_r", "lora_alpha", "max_length"):
            if getattr(self, name) < 1:
                raise SimsError(f"DPO {name} must be >= 1, got {getattr(self, name)}")
        if self.beta <= 0 or self.learning_rate <= 0:
            raise SimsError(f"DPO beta and learning rate must be > 0, got {self.beta}, {self.learning_rate}")
        if not 0 <= self.lora_dropout < 1:
            raise SimsError(f"LoRA dropout must be in [0, 1), got {self.lora_dropout}")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise SimsError(f"--max-pairs must be >= 1, got {self.max_pairs}")


@dataclass(frozen=True)
class DPOResult:
    """What training the adapter cost and produced (recorded in the baseline's ``config.json``)."""

    num_pairs: int
    tokens_trained: int
    tokens_forward: int
    fit_seconds: float
    adapter_bytes: int
    train_loss: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def require_baselines_extra() -> None:
    """Raise one :class:`SimsError` line naming the extra when TRL or peft is missing."""
    try:
        import peft  # noqa: F401
        import trl  # noqa: F401
    except ImportError as exc:
        raise SimsError(
            f"the DPO baseline needs TRL and peft ({exc.name or 'trl or peft'} is missing): {INSTALL_HINT}"
        ) from None


def _lora_config(config: DPOBaselineConfig, num_layers: int):
    from peft import LoraConfig

    layers = parse_layers(config.lora_layers, num_layers) if config.lora_layers else None
    return LoraConfig(
        layers_to_transform=layers,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules) if config.target_modules else None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _trainer_class():
    from trl import DPOTrainer

    class PretokenisedDPOTrainer(DPOTrainer):
        """TRL's trainer on rows already tokenised the way the model saw them.

        TRL would tokenise ``prompt + answer`` text and append EOS to every answer;
        the run's answers were generated as tokens after the chat-templated prompt, and a
        cut-off answer has no EOS, so the rows are built by :func:`encode_dpo_pairs`.
        """

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return PretokenisedDPOTrainer


def _no_checkpointing(config_class: type) -> dict[str, bool]:
    """Activation checkpointing off (tiny models on CPU): transformers 5 renamed the
    option that TRL switches on by default; the old name warns there."""
    names = {f.name for f in fields(config_class)}
    return {
        "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False
    }


def _quiet_callbacks(trainer: Any, progress: bool) -> None:
    """No printed log dicts (transformers prints each one); a bare tqdm bar if ``progress``."""
    from transformers import PrinterCallback, ProgressCallback

    class BarOnly(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # the bar, not the numbers
            return None

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(BarOnly())


def fit_dpo(
    lm: LoadedModel,
    pairs: list[DPOPair],
    folder: Path,
    config: DPOBaselineConfig | None = None,
    progress: bool = False,
) -> DPOResult:
    """Train a LoRA adapter with DPO on ``pairs`` and save it to ``folder``.

    ``lm`` is used up: the trainer wraps its model in place (load a fresh one for
    anything else).

    Args:
        lm: the base model with its tokenizer.
        pairs: the preference pairs (:func:`~.dpo_pairs.run_pairs`).
        folder: where the adapter goes (``adapter_config.json`` +
            ``adapter_model.safetensors``; written in one step).
        config: the training settings.
        progress: show TRL's progress bar (no other logging, no report to any tracker).

    Returns:
        the pairs trained on, tokens, seconds, the adapter's size and the mean
        training loss (ln 2 = 0.693 is where DPO starts).

    Example:
        >>> lm = load_model(device="cpu", dtype="fp32")  # the run's model, fresh
        >>> fit_dpo(lm, run_pairs("runs/sims"), Path("runs/dpo/adapter"))
    """
    require_baselines_extra()
    from datasets import Dataset
    from trl import DPOConfig

    config = config or DPOBaselineConfig()
    rows, kept = encode_dpo_pairs(lm.tokenizer, pairs, end_token_id(lm.tokenizer, lm.model))
    if not rows:
        raise SimsError("no preference pairs to train DPO on: the run labelled no D+ / D- answers")
    # What goes through the model: prompt + answer per side, cut as the collator cuts it.
    per_epoch = sum(
        min(len(r["prompt_ids"]) + len(r[side]), config.max_length)
        for r in rows
        for side in ("chosen_ids", "rejected_ids")
    )
    model = lm.model
    model.requires_grad_(False)  # LoRA's own weights are the only trainable ones
    with tempfile.TemporaryDirectory(prefix="simsteer-dpo-") as work:
        args = DPOConfig(
            output_dir=work,  # checkpoints and training_args.bin would land here: deleted
            beta=config.beta,
            learning_rate=config.learning_rate,
            num_train_epochs=config.epochs,
            per_device_train_batch_size=config.batch_size,
            max_length=config.max_length,
            seed=config.seed,
            data_seed=config.seed,
            use_cpu=config.device == "cpu",
            bf16=False,  # TRL's default turns bf16 on; the baseline trains in fp32
            fp16=False,
            **_no_checkpointing(DPOConfig),
            save_strategy="no",
            report_to="none",
            logging_strategy="no",  # the mean loss comes back from train(); no per-step prints
            disable_tqdm=not progress,
            dataloader_num_workers=0,
            remove_unused_columns=False,
        )
        with warnings.catch_warnings():  # transformers' renames inside TRL / peft: not the user's to fix
            warnings.simplefilter("ignore", FutureWarning)
            trainer = _trainer_class()(
                model=model,
                args=args,
                train_dataset=Dataset.from_list(rows),
                processing_class=lm.tokenizer,
                peft_config=_lora_config(config, lm.num_layers),
            )
            _quiet_callbacks(trainer, progress)
            clock = time.perf_counter()
            output = trainer.train()
            seconds = time.perf_counter() - clock
        with staged_dir(folder) as tmp:
            trainer.model.save_pretrained(str(tmp), safe_serialization=True)
            for path in tmp.iterdir():  # keep peft's two files; its model card names temp paths
                if path.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                    path.unlink()
                else:  # safetensors writes 0o600: readable like the rest of the folder
                    path.chmod(new_file_mode())
    size = (folder / ADAPTER_WEIGHTS).stat().st_size + (folder / ADAPTER_CONFIG).stat().st_size
    return DPOResult(
        num_pairs=len(kept),
        tokens_trained=per_epoch * config.epochs,
        # each step runs every sequence twice: the policy, and the reference (adapter off)
        tokens_forward=2 * per_epoch * config.epochs,
        fit_seconds=round(seconds, 2),
        adapter_bytes=size,
        train_loss=round(float(output.training_loss), 4),
    )


def build_dpo_baseline(
    source: dict[str, Any], pairs: list[DPOPair], out: Path, config: DPOBaselineConfig, progress: bool
) -> dict[str, Any]:
    """Train the adapter for a baseline folder ``out`` and write its pairs file; returns the
    entries :func:`~.baselines.write_baseline` adds to ``config.json``.

    Args:
        source: the run's model spec (``source``, ``trust_remote_code``).
        pairs: the run's preference pairs.
        out: the baseline folder.
        config: the training settings.
        progress: show a progress bar.
    """
    require_baselines_extra()
    lm = load_model(
        source["source"],
        device=config.device,
        dtype="fp32",
        trust_remote_code=bool(source.get("trust_remote_code", False)),
    )
    fingerprint = lm.fingerprint()
    # The pairs file lists exactly what was trained on (pairs that teach nothing are left out).
    _, kept = encode_dpo_pairs(lm.tokenizer, pairs, end_token_id(lm.tokenizer, lm.model))
    result = fit_dpo(lm, kept, out / ADAPTER_DIR, config, progress)
    write_jsonl(out / PAIRS_FILE, [p.to_json() for p in kept])
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
    return {
        "dpo": settings,
        "fingerprint": fingerprint,
        **result.to_json(),
        "saved_bytes": result.adapter_bytes,
    }


def load_dpo_model(folder: str | Path, base: LoadedModel) -> LoadedModel:
    """The base model with a ``dpo`` baseline's adapter merged into its weights.

    A fresh copy of the base is loaded (``base`` is left as it is); the adapter is read
    with safetensors only, and a folder whose adapter is missing is refused.

    Args:
        folder: the baseline folder (or its ``adapter/`` folder).
        base: the loaded base model (its source, dtype and device are reused).

    Example:
        >>> policy = load_dpo_model("runs/dpo", load_model())
    """
    require_baselines_extra()
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    adapter = folder if (folder / ADAPTER_WEIGHTS).is_file() else folder / ADAPTER_DIR
    if not (adapter / ADAPTER_WEIGHTS).is_file() or not (adapter / ADAPTER_CONFIG).is_file():
        raise SimsError(f"{folder} has no DPO adapter ({ADAPTER_DIR}/{ADAPTER_WEIGHTS} is missing)")
    try:  # a JSON file; peft's base_model_name_or_path in it is ignored (the run's model is the base)
        lora = LoraConfig.from_pretrained(str(adapter))
    except (TypeError, ValueError, json.JSONDecodeError) as exc:
        raise SimsError(f"{adapter / ADAPTER_CONFIG}: not a LoRA adapter config ({exc})") from None
    fresh = load_model(
        base.source, device=base.device, dtype=base.dtype, trust_remote_code=base.trust_remote_code
    )
    with warnings.catch_warnings():  # as in fit_dpo
        warnings.simplefilter("ignore", FutureWarning)
        wrapped = get_peft_model(fresh.model, lora)
    result = set_peft_model_state_dict(wrapped, load_file(str(adapter / ADAPTER_WEIGHTS)))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        key = (list(result.unexpected_keys) + missing)[0]
        raise SimsError(f"{adapter}: the adapter does not fit {base.source} ({key})")
    merged = wrapped.merge_and_unload()
    merged.eval().requires_grad_(False)
    return LoadedModel(
        model=merged, tokenizer=fresh.tokenizer, source=base.source, trust_remote_code=base.trust_remote_code
    )


def dpo_mc(
    base: LoadedModel, policy: LoadedModel, items: Sequence[Any], batch_size: int = 16
) -> dict[str, Any]:
    """Multiple-choice results of the base model and of the DPO model on ``items``, with
    the policy's paired differences against the base (as ``sims eval`` reports a steering).

    Args:
        base: the base model.
        policy: the base with the adapter merged (:func:`load_dpo_model`).
        items: the task's items.
        batch_size: sequences per forward pass.
    """
    out, rows = evaluate_mc(base, items, {"base": []}, batch_size, return_rows=True)
    out |= evaluate_mc(policy, items, {"policy": []}, batch_size, reference=None, reference_rows=rows["base"])
    return out

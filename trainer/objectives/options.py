"""Option mixins shared by objectives: one definition and one validation per group of options.

``InfoNCEOptions``: the InfoNCE family's loss switch (OBJECTIVES.md, section A). Every objective whose loss is
a softmax over one positive and K negatives mixes it into its ``Options`` dataclass and gets ``temperature``,
``loss`` (``infonce`` | ``nce`` | ``flatnce`` | ``debiased`` | ``hcl``) and the kinds' own options (``tau_plus``,
``beta``, ``noise_probability``, ``normaliser``), validated once, when the options are parsed, with an error that
names the bad value. ``loss_options()`` picks what the chosen kind takes, for
``trainer.losses.contrastive_loss(_from_similarities)``.

Mixing in (all fields have defaults, so the order of bases is free): ``class SimCLROptions(InfoNCEOptions,
TwoViewOptions)``; a subclass re-declares a field to change its default (``temperature: float = 0.07``) and
sets ``EXTRA_LOSSES`` for losses of its own beside the family (InvaSpread's ``invaspread``). A subclass with a
``__post_init__`` of its own calls ``super().__post_init__()``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from trainer.losses.nce_family import CONTRASTIVE_LOSSES, loss_options_for


def as_number(options: Any, name: str) -> float:
    """``options.name`` as a float, stored back (YAML reads "1e-3", with no dot, as a string); a clear error
    naming the option otherwise. ``parse_options`` prefixes the objective's key to the message."""
    value = getattr(options, name)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    setattr(options, name, number)
    return number


def require_at_least(options: Any, minimum: int, *names: str) -> None:
    """Every option in ``names`` (widths, counts, layers) is >= ``minimum``; the error names the first that is not."""
    for name in names:
        if getattr(options, name) < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {getattr(options, name)}")


def require_positive(options: Any, *names: str) -> None:
    """Every option in ``names`` (temperatures, epsilons) is a number > 0; the error names the first that is not."""
    for name in names:
        if as_number(options, name) <= 0:
            raise ValueError(f"{name} must be > 0, got {getattr(options, name)}")


def require_non_negative(options: Any, *names: str) -> None:
    """Every option in ``names`` (loss weights) is a number >= 0; the error names the first that is not."""
    for name in names:
        if as_number(options, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(options, name)}")


def require_in_range(options: Any, low: float, high: float, *names: str) -> None:
    """Every option in ``names`` is a number in the closed interval [low, high]."""
    for name in names:
        if not low <= as_number(options, name) <= high:
            raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {getattr(options, name)}")


def require_momentum_schedule(options: Any) -> None:
    """``momentum`` (EMA of a target network at step 0) and ``final_momentum`` (at the end) satisfy
    0 <= momentum <= final_momentum <= 1."""
    if not 0.0 <= as_number(options, "momentum") <= as_number(options, "final_momentum") <= 1.0:
        raise ValueError(f"need 0 <= momentum <= final_momentum <= 1, got {options.momentum}, "
                         f"{options.final_momentum}")


@dataclass
class InfoNCEOptions:
    temperature: float = 0.1               # tau (> 0); objectives set their paper's value
    loss: str = "infonce"                  # infonce | nce | flatnce | debiased | hcl (+ EXTRA_LOSSES)
    tau_plus: float = 0.1                  # debiased / hcl: class prior of false negatives, in [0, 1)
    beta: float = 1.0                      # hcl: concentration on hard negatives, >= 0
    noise_probability: float | None = None  # nce: Pn in (0, 1]; None: 1 / (K + 1), or the objective's own
    normaliser: float | None = None        # nce: Z > 0; None: estimated from each batch, or the objective's own

    EXTRA_LOSSES: ClassVar[tuple[str, ...]] = ()  # losses of the objective's own, accepted beside the family

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        known = (*self.EXTRA_LOSSES, *CONTRASTIVE_LOSSES)
        if self.loss not in known:
            raise ValueError(f"loss {self.loss!r} is not one of {', '.join(known)}")
        require_positive(self, "temperature")
        if not 0.0 <= as_number(self, "tau_plus") < 1.0:
            raise ValueError(f"tau_plus must be in [0, 1), got {self.tau_plus}")
        require_non_negative(self, "beta")
        if self.noise_probability is not None and not 0.0 < as_number(self, "noise_probability") <= 1.0:
            raise ValueError(f"noise_probability must be in (0, 1], got {self.noise_probability}")
        if self.normaliser is not None and as_number(self, "normaliser") <= 0:
            raise ValueError(f"normaliser must be > 0, got {self.normaliser}")

    def loss_options(self) -> dict[str, Any]:
        """The keyword options the chosen ``loss`` takes (``LOSS_OPTIONS``); {} for an ``EXTRA_LOSSES`` kind."""
        if self.loss not in CONTRASTIVE_LOSSES:
            return {}
        return loss_options_for(self.loss, vars(self))


def check_crop_scale(crop_scale) -> tuple[float, float]:
    """(low, high) with 0 < low <= high <= 1: the random-resized-crop area range of an image-text view (clip-like
    objectives' ``crop_scale``)."""
    values = tuple(float(v) for v in crop_scale)
    if len(values) != 2 or not 0 < values[0] <= values[1] <= 1:
        raise ValueError(f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {list(crop_scale)}")
    return values

"""The training regimes of ``dogkit train --exp N``, as one table: each row's number, short name and preset
settings. The config, the run folders, the report, the study and the CLI all read it. No torch here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True)
class Regime:
    number: int
    name: str  # its short description, for the report ("1: pretrained + Adam") and `dogkit train --help`
    # Settings over TrainConfig's defaults, by field name (resolve_config refuses a name that is none).
    settings: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # One row is shared by every consumer: read-only, so nobody changes a preset in place.
        object.__setattr__(self, "settings", MappingProxyType(dict(self.settings)))

    @property
    def label(self) -> str:
        return f"{self.number}: {self.name}"

    @property
    def pretrained(self) -> bool:
        """Starts from ImageNet (or stand-in) weights; TrainConfig's default is True."""
        return bool(self.settings.get("pretrained", True))


# Regime 3 gets a recipe of its own: from scratch, a short light fine-tuning recipe memorises the training set
# (99.9% train vs 21% test in one report we know of).
TABLE: dict[int, Regime] = {r.number: r for r in (
    Regime(1, "pretrained + Adam", {
        "pretrained": True, "optimizer": "adam", "lr": 1e-4, "schedule": "cosine", "warmup_epochs": 1,
        "epochs": 15, "augment": "light", "label_smoothing": 0.1}),
    Regime(2, "pretrained + Averaged Adam", {
        "pretrained": True, "optimizer": "averaged-adam", "lr": 1e-4, "schedule": "constant", "epochs": 15,
        "augment": "light", "label_smoothing": 0.1, "avg_window": 1000, "avg_ema": [0.99, 0.999]}),
    Regime(3, "from scratch + Adam", {
        "pretrained": False, "optimizer": "adam", "lr": 1e-3, "weight_decay": 5e-5, "schedule": "cosine",
        "warmup_epochs": 5, "epochs": 120, "augment": "strong", "label_smoothing": 0.1, "dropout": 0.2}),
)}

WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


def numbers() -> tuple[int, ...]:
    """The regimes' numbers, in order (read at call time, so a row added to TABLE counts everywhere)."""
    return tuple(sorted(TABLE))


def regime(number: object) -> Regime | None:
    return TABLE.get(number) if isinstance(number, int) and not isinstance(number, bool) else None


def pretrained_numbers() -> tuple[int, ...]:
    return tuple(n for n in numbers() if TABLE[n].pretrained)


def either(items: Iterable[object], word: str = "or") -> str:
    """``1, 2 or 3``."""
    items = [str(i) for i in items]
    return f"{', '.join(items[:-1])} {word} {items[-1]}" if len(items) > 1 else "".join(items)


def in_words(n: int) -> str:
    return WORDS.get(n, str(n))


def exp_problem(value: int) -> str | None:
    """Why ``value`` is no regime's number, or None."""
    return None if value in TABLE else f"must be {either(numbers())}, got {value}"

"""How the referral rule is allowed to act on this site right now: the deployment mode and whether its guarantee is
suspended (docs/guarantee.md). Applied to every answer's referral after the rule has decided.

* ``shadow``: every film is referred (reason ``shadow_mode``); what the rule decided is still in the answer and
  the audit record, so its would-be clearances can be checked against the radiologists' verdicts.
* ``supervised``: the rule's referral stands, but every film is still read (``review_required``); verdicts are
  expected for the cleared films.
* ``autonomous``: the rule's referral stands; cleared films are not sent for reading.
* ``suspended`` (any mode): every film is referred (reason ``guarantee_suspended``) until a person re-enables the
  rule. The service suspends by itself (``service.guarantee``); it never resumes or moves up a mode by itself.

The holder is set by the lifespan from the trail's last recorded state and by the guarantee watch; the pipeline
reads it for each answer (no lock needed: one reference, replaced whole).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from service.schemas import Referral

Mode = Literal["shadow", "supervised", "autonomous"]
MODES: tuple[Mode, ...] = ("shadow", "supervised", "autonomous")
SHADOW_MODE: Final = "shadow_mode"
GUARANTEE_SUSPENDED: Final = "guarantee_suspended"


@dataclass(frozen=True)
class Operating:
    mode: Mode = "autonomous"
    suspended: bool = False


class OperatingSwitch:
    """The current :class:`Operating`, replaced whole (readers never see half an update)."""

    def __init__(self, initial: Operating | None = None) -> None:
        self._current = initial or Operating()

    def get(self) -> Operating:
        return self._current

    def set(self, operating: Operating) -> None:
        self._current = operating


def apply(referral: Referral, operating: Operating) -> Referral:
    """The answer's referral under ``operating``: the rule's own reasons kept, the state's added."""
    reasons = list(referral.reasons)
    refer = referral.refer
    if operating.mode == "shadow":
        refer, reasons = True, [*reasons, SHADOW_MODE]
    if operating.suspended:
        refer, reasons = True, [*reasons, GUARANTEE_SUSPENDED]
    review = refer or operating.mode != "autonomous"
    return referral.model_copy(
        update={"refer": refer, "reasons": reasons, "mode": operating.mode, "review_required": review}
    )

"""Is a film in the intended population (adult frontal chest radiographs)? What its header and its sender say.

A film can be cleared as normal only when its population is *verified*: something positively says the patient is
an adult and the view is frontal. For DICOM the header says it (Patient's Age, View Position; Body Part Examined
when present must be the chest). A PNG or JPEG carries no header, so a client may declare ``patient_age`` (years)
and ``view``; a film with neither header nor declaration can still be scored but is never cleared.

Either source can put a film outside the population (a child, a lateral view): a declaration never overrides a
header that says so, and a header never hides a declaration that says so. Neither the header values nor the
declared ones are kept beyond the codes returned here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, get_args

from bayesnet.imaging import (
    VERIFIED_AGE,
    VERIFIED_VIEW,
    ImageFacts,
    population_evidence,
    population_flags,
)

__all__ = ["DECLARED_VIEWS", "Declared", "DeclaredView", "Population", "assess"]

#: The views a client may declare, in DICOM's View Position spelling where it has one.
DeclaredView = Literal["PA", "AP", "LATERAL", "LL", "RL", "OBLIQUE", "DECUBITUS"]
DECLARED_VIEWS: Final[tuple[str, ...]] = get_args(DeclaredView)

#: What verification needs, in the order ``Population.missing`` lists it.
_NEEDED: Final[tuple[str, ...]] = (VERIFIED_AGE, VERIFIED_VIEW)


@dataclass(frozen=True)
class Declared:
    """What a client declared about the film (None: not declared)."""

    age_years: float | None = None
    view: str | None = None

    def __post_init__(self) -> None:
        if self.age_years is not None and not 0.0 <= self.age_years <= 150.0:
            raise ValueError(f"patient_age must be between 0 and 150 years, got {self.age_years}")
        if self.view is not None and self.view.upper() not in DECLARED_VIEWS:
            raise ValueError(f"view must be one of {', '.join(DECLARED_VIEWS)}, got {self.view!r}")


@dataclass(frozen=True)
class Population:
    """The verdict: ``flags`` (``POPULATION_*`` codes: outside the population), ``verified`` (adult and frontal
    established, nothing flagged), ``missing`` (what nobody established: ``"age"``, ``"view"``)."""

    flags: tuple[str, ...]
    verified: bool
    missing: tuple[str, ...]


def _declared_age_code(age_years: float) -> str:
    """A declared age in the DICOM AS form the header checks read: whole years truncate (17.9 is a child), under a
    year in days."""
    return f"{min(999, round(age_years * 365.25)):03d}D" if age_years < 1 else f"{min(999, int(age_years)):03d}Y"


def assess(facts: ImageFacts, declared: Declared | None = None) -> Population:
    """The population verdict of one film from its decoded facts (header codes) and the client's declaration."""
    declared = declared or Declared()
    age = None if declared.age_years is None else _declared_age_code(declared.age_years)
    view = None if declared.view is None else declared.view.upper()
    flags = list(facts.population_flags)
    for flag in population_flags(body_part=None, view_position=view, age=age):
        if flag not in flags:
            flags.append(flag)
    established = set(facts.population_verified) | set(population_evidence(view_position=view, age=age))
    missing = tuple(need for need in _NEEDED if need not in established)
    return Population(flags=tuple(flags), verified=not flags and not missing, missing=missing)

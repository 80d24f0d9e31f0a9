"""HTTP content negotiation (RFC 9110 section 12.5.1): which of the media types we offer an Accept header prefers.

Pure functions, no FastAPI: the routes call ``choose_media_type`` and decide what an unsatisfiable header
means for them. Only what the predict endpoints need is modelled: media ranges with wildcards, ``q``
weights, and FHIR's ``fhirVersion`` parameter (a client asking for another FHIR version is not served R4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: The default representation of every endpoint.
JSON = "application/json"
#: FHIR's JSON media type (R4 section 3.1.0.1.2); the old DSTU2 spelling is accepted as an alias.
FHIR_JSON = "application/fhir+json"
FHIR_JSON_ALIASES = frozenset({FHIR_JSON, "application/json+fhir"})
#: The FHIR version we emit, as the ``fhirVersion`` media-type parameter spells it (major.minor).
FHIR_VERSION = "4.0"
FHIR_JSON_R4 = f"{FHIR_JSON}; fhirVersion={FHIR_VERSION}"
#: A DICOM Part 10 file (PS3.18 8.7.3): /v1/predict answers a DICOM SR for a DICOM upload (docs/dicom.md).
DICOM = "application/dicom"


@dataclass(frozen=True)
class MediaRange:
    """One element of an Accept header, lower-cased: ``type/subtype;params;q=weight``."""

    type: str
    subtype: str
    params: tuple[tuple[str, str], ...]
    q: float

    @property
    def specificity(self) -> int:
        """RFC 9110 precedence: ``*/*`` < ``type/*`` < ``type/subtype`` < with parameters."""
        if self.type == "*":
            return 0
        if self.subtype == "*":
            return 1
        return 3 if self.params else 2

    def matches(self, media_type: str) -> bool:
        """Whether this range covers ``media_type`` (one of ours, lower-case, without parameters)."""
        kind, _, sub = media_type.partition("/")
        if self.type == "*":
            return True
        if self.type != kind:
            return False
        if self.subtype == "*":
            return True
        if media_type in FHIR_JSON_ALIASES:
            if f"{self.type}/{self.subtype}" not in FHIR_JSON_ALIASES:
                return False
            version = dict(self.params).get("fhirversion")
            # "4.0" and a full "4.0.1" both name R4; any other version is a different format.
            return version is None or version == FHIR_VERSION or version.startswith(FHIR_VERSION + ".")
        return self.subtype == sub


def parse_accept(header: str) -> list[MediaRange]:
    """The media ranges of an Accept header; malformed elements are skipped (never an error)."""
    ranges = []
    for element in header.split(","):
        parts = [p.strip() for p in element.split(";")]
        kind, slash, sub = parts[0].lower().partition("/")
        if not slash or not kind or not sub or (kind == "*" and sub != "*"):
            continue
        q = 1.0
        params = []
        valid = True
        for part in parts[1:]:
            name, eq, value = part.partition("=")
            name, value = name.strip().lower(), value.strip().strip('"')
            if not eq or not name:
                continue
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    valid = False
                    break
                if not 0.0 <= q <= 1.0:
                    valid = False
                    break
            else:
                params.append((name, value.lower()))
        if valid:
            ranges.append(MediaRange(kind, sub, tuple(params), q))
    return ranges


def quality(ranges: Sequence[MediaRange], media_type: str) -> tuple[float, int]:
    """``(q, specificity)`` the most specific matching range gives ``media_type``; ``(0, -1)`` if none matches."""
    best: MediaRange | None = None
    for candidate in ranges:
        if candidate.matches(media_type) and (best is None or candidate.specificity > best.specificity):
            best = candidate
    return (best.q, best.specificity) if best is not None else (0.0, -1)


def choose_media_type(header: str | None, offers: Sequence[str]) -> str | None:
    """The offer ``header`` prefers, or ``None`` when it accepts none of them.

    No header, an empty one or one with no parseable range accepts anything: the first offer (our default).
    Ties on ``q`` go to the offer named explicitly over one reached through a wildcard, then to the earlier
    offer, so ``*/*`` and ``application/*`` get the default and a FHIR client naming only FHIR gets FHIR.
    """
    ranges = parse_accept(header) if header else []
    if not ranges:
        return offers[0] if offers else None
    best: str | None = None
    best_key = (0.0, -1)
    for offer in offers:  # strict ">" keeps the earlier offer on a tie
        key = quality(ranges, offer)
        if key[0] > 0 and (key[0], min(key[1], 2)) > (best_key[0], min(best_key[1], 2)):
            best, best_key = offer, key
    return best

"""The sentences a person reads about a result, wherever it is shown: the FHIR report's conclusion and the DICOM
result page say the same thing in the same words."""

from __future__ import annotations

DISCLAIMER = "Research software, not a medical device: not a diagnosis."
NO_CLEARING = "This model cannot rule out any finding at its stated guarantee; every film goes to a radiologist."
WITHHELD_WORDS = {
    "out_of_distribution": "the image does not look like a frontal chest radiograph",
    "outside_intended_population": "the film is outside the intended population (adult frontal chest radiographs)",
}
OOD_WARNING = (
    "This image does not look like the frontal chest radiographs the model was trained on: "
    "its findings should not be trusted."
)

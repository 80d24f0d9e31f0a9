"""Radiologists' verdicts on scored films (issue #30): parsing (``parsing``)."""

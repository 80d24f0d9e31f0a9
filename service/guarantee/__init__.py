"""The referral rule's guarantee in operation (issue #30, docs/guarantee.md): watched on the site's films with the
radiologists' verdicts (``watch``)."""

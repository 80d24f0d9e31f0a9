"""``python -m service.settings``: print, write or check the settings reference (docs/settings.md)."""

from service.settings.reference import main

raise SystemExit(main())

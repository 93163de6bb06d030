"""payler, the payload spooler: take messages from brokers now, deliver them later — durably."""

from __future__ import annotations

__version__ = "1.0.0.dev0"

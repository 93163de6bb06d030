"""Fault-injection points: where a test makes payler die, to prove that nothing is lost there.

Set ``PAYLER_FAULT`` to a point's name and payler exits at once (``os._exit``, like a kill -9:
no cleanup, no acknowledgement, no flush) the first time it reaches that point. Unset, a point
costs one dictionary lookup. Points:

- ``after-store``: the ingest batch is durably stored, its source messages not yet acknowledged.
- ``after-publish``: the due batch is confirmed by the broker, its spool entries not yet deleted.
- ``after-outputs``: a ``handle`` workflow's outputs are published (confirmed) and stored, its
  source messages (or spool entries) not yet acknowledged.
"""

from __future__ import annotations

import os
import sys
from typing import Literal

FaultPoint = Literal["after-store", "after-publish", "after-outputs"]
#: The exit status of an injected fault (that of a process killed by SIGKILL, as shells show it).
FAULT_EXIT_STATUS = 137


def fault_point(name: FaultPoint) -> None:
    """Die here if ``PAYLER_FAULT`` names this point."""
    if os.environ.get("PAYLER_FAULT") == name:
        sys.stderr.write(f"payler: injected fault at {name!r}: exiting now\n")
        sys.stderr.flush()
        os._exit(FAULT_EXIT_STATUS)

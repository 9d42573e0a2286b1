"""How every helios-ray command prints a result: JSON for machines, a human rendering otherwise.

Shared by the ``helios-ray`` command and the commands plugged into it (``bench``), so ``--json`` means the same
everywhere.
"""

from __future__ import annotations

import json
from typing import Any, Callable


def emit(obj: Any, as_json: bool, human: Callable[[Any], str] | None = None) -> None:
    """Print ``obj`` as indented JSON when asked (or when there is no human form), else ``human(obj)``."""
    if as_json or human is None:
        print(json.dumps(obj, indent=2, default=str))
    else:
        print(human(obj))

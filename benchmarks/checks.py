"""The check recorder of the GPU check scripts (gpu_check.py, gpu_train_check.py): each check runs
once on a lent machine, so a failing one is recorded with its error and the run goes on."""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from typing import Any


def record(checks: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> None:
    """Run `fn`, store its result (its `ok`, default true) or its error, and the seconds taken,
    under `checks[name]`; print it as one line."""
    start = time.perf_counter()
    try:
        result = fn()
        checks[name] = {"ok": bool(result.pop("ok", True)), **result}
    except Exception as err:  # noqa: BLE001 - record and go on: one run only
        checks[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        traceback.print_exc()
    checks[name]["seconds"] = round(time.perf_counter() - start, 2)
    print(f"check {name}: {json.dumps(checks[name])}", flush=True)

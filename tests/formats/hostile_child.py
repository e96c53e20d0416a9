"""Runs the hostile-file cases of test_hostile_files.py in one process and prints one JSON line per case.

    python hostile_child.py cases.json

cases.json: {"warm_up": [[call, path], ...], "cases": [{"id", "call", "path"}, ...]}, where call is
"load" (qkv.load) or "load_tokenizer" (qkv.load_tokenizer). The warm-up loads valid files first, so
that imports and first-use set-up (safetensors, meta tensors, tokenizers) are not charged to a case.

For each case the line holds the exception's type and message, the wall time of the call, and the
growth of the resident set: the peak RSS during the call (VmHWM, reset to the current RSS before it
through /proc/self/clear_refs) minus the RSS just before it. Where the peak cannot be reset, the
peak so far is used instead, which can only overstate the growth.
"""

from __future__ import annotations

import gc
import json
import re
import sys
import time
import warnings


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1))


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "reset the peak resident set size to the current RSS" (proc(5))
        return True
    except OSError:
        return False


def main(spec_path: str) -> None:
    import qkv

    calls = {"load": qkv.load, "load_tokenizer": qkv.load_tokenizer}
    with open(spec_path) as f:
        spec = json.load(f)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for call, path in spec["warm_up"]:
            calls[call](path)
    for case in spec["cases"]:
        gc.collect()
        peak_reset = _reset_peak()
        before = _status_kib("VmRSS")
        start = time.perf_counter()
        error = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                calls[case["call"]](case["path"])
        except Exception as exc:  # reported to the parent, which checks the type
            error = exc
        seconds = time.perf_counter() - start
        growth_kib = _status_kib("VmHWM") - before
        result = {
            "id": case["id"],
            "type": type(error).__name__ if error else None,
            "mro": [c.__name__ for c in type(error).__mro__] if error else [],
            "message": str(error)[:2000] if error else None,
            "seconds": seconds,
            "rss_growth_mib": growth_kib / 1024,
            "peak_reset": peak_reset,
        }
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])

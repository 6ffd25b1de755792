"""Stack dumps of every Python process of a run that may hang (benchmarks/gpu_parallel.py puts this directory first
on PYTHONPATH). vLLM's workers are spawned processes: each imports ``sitecustomize`` at start, so with
``SW_HANG_DUMP_S=N`` set each one prints all its threads' stacks to its stderr after N seconds (once), which shows
where a worker waits when the engine does not become ready. Diagnosis only; never on the serving path.
"""

import faulthandler
import os
import sys

_s = os.environ.get("SW_HANG_DUMP_S", "")
if _s:
    try:
        faulthandler.dump_traceback_later(float(_s), repeat=False, file=sys.stderr)
    except (ValueError, RuntimeError):
        pass

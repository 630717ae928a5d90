"""Worker process for one point: `python -m benchmarks.worker '<PointSpec as JSON>'`.

Prints the `Record` as JSON on a line starting with RESULT_PREFIX (last line of stdout). A fresh
process per point gives each point its own peak RSS and confines a crash or an OOM kill to it.
"""

from __future__ import annotations

import json
import sys

RESULT_PREFIX = "RESULT "


def main(argv: list[str]) -> int:
    # Imported here so that `benchmarks.sweep` can read RESULT_PREFIX without importing torch.
    from .measure import measure_point
    from .record import PointSpec

    spec = PointSpec(**json.loads(argv[1]))
    record = measure_point(spec)
    print(RESULT_PREFIX + json.dumps(record.to_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

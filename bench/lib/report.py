"""bench reports: every benchmark prints its Markdown table and writes it
with the full data next to it, as <name>-<UTC time>.{json,md} (plus any
plots the caller adds under the same base name)."""

import json
import sys
import time


def write_results(out, name, data, table):
    """Prints `table`, writes `data` (JSON) and `table` (Markdown) under
    `out`; returns the base path (no suffix) for extra files."""
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    base.with_suffix(".json").write_text(json.dumps(data, indent=2))
    base.with_suffix(".md").write_text(table)
    print(f"wrote {base}.{{json,md}}", file=sys.stderr)
    return base

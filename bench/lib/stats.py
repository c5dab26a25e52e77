"""bench statistics and table cells: medians with their spread, and
percentiles, the same way in every benchmark's report."""

import statistics


def spread(values):
    """Median, min and max of the values that are not None; None if none."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def cell(s, digits, scale=1):
    """A table cell for a spread: "median (min..max)", scaled; "-" if None."""
    if s is None:
        return "-"
    return f"{s['median'] * scale:.{digits}f} ({s['min'] * scale:.{digits}f}..{s['max'] * scale:.{digits}f})"


def percentile(values, q):
    """The q-th percentile (nearest rank) of the values; None if empty."""
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]

"""Units, marks and figures that every layer writes alike. A base module without imports of the
package's, so that the modules that keep torch out (the monitor, the report) share them too."""

import math

GIB = 1024**3
"""Bytes in a GiB: memory is reported in GiB throughout."""

NO_VALUE = "–"
"""What a table or a text shows where a figure is missing (an en dash)."""


def significant(value: float, digits: int = 3) -> str:
    """138, 22.3, 0.412: three significant figures like the seed's table; integers stay whole."""
    if value == 0 or not math.isfinite(value):
        return str(value)
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(digits - 1 - magnitude, 0)
    return f"{value:.{decimals}f}"

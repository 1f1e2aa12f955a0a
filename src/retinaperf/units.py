"""Units and marks that every layer writes alike. A base module without imports, so that the
modules that keep torch out (the monitor, the report) share them too."""

GIB = 1024**3
"""Bytes in a GiB: memory is reported in GiB throughout."""

NO_VALUE = "–"
"""What a table or a text shows where a figure is missing (an en dash)."""

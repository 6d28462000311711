"""Grids, charts, the report, the interpolation strip and revision comparisons."""

"""Tasks: bundled and user data, k-shot splits, templates, label words, calibration, losses."""

"""Per-arm metrics, the study tables, plots, the static HTML report and ``verify``.

Everything here works from raw verdict logs, manifests and small JSON files alone (no model, no
GPU), so a reviewer can recompute every number; keep imports light (no torch/transformers).
"""

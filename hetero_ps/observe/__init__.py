"""Watching a run: metrics records, the experiment folder, progress lines, logs, TensorBoard, profiling,
the dashboard."""

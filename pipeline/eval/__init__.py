"""Evaluation: predictions of clean / UAP / random inputs in one pass (predictions), the metrics on them
(metrics), and the measurements a task logs (measurements)."""

"""The report: tables (tables) and figures (figures) from the runs in the MLflow store; `python -m pipeline.report`."""

"""MLflow: runs and metrics, the metric buffer, what a reviewer reads, plots, the HTML report, logged models."""

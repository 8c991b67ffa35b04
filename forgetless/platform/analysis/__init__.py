"""Pure analysis of results: the forgetting metrics, result types, Pareto fronts and paired statistics (no Ray, MLflow or torch)."""

"""Stage 8, tracking: results/ mirrored to MLflow, live and after the fact; the registry."""

"""Stage 7, evaluation: held-out metrics with their protocol, baselines and samples."""

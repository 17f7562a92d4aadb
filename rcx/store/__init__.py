"""What a run leaves behind: checkpoints, MLflow tracking and plots."""

"""Operations around the model: MLflow tracking, the model registry, the promotion gate, plots."""

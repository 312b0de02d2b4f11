"""Operations: process supervision, the MLflow/Prefect server specs, stack.env, the Prefect REST client, the team stack."""

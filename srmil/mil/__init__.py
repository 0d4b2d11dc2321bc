"""Multiple-instance learning: models, bags, training, inference, metrics, evaluation,
prediction on new slides."""

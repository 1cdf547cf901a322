"""Evaluations of a trained model beyond the training loop's validation loss."""

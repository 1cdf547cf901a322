"""Fine-tuning a trained model: parameter-efficient adapters."""

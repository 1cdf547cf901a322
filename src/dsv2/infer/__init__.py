"""Inference: latent KV cache, sampling, the plain generate loop and the batched engine."""

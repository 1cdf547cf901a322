"""Training-only pieces of DeepSeek-V2: the balance losses and device-level token dropping (paper §2.2.3-2.2.4).

Everything here is a pure function of the router's outputs; the model code never imports it.
"""

"""Training: one core (`core.py`: step and loop) that every stage runs on (`pretrain.py`), the balance losses
and token dropping (`balance.py`), schedules (`optim.py`), checkpoints, and the parallelism plumbing.

The model code never imports any of it: routing comes out of the forward as values, and token dropping and
expert parallelism are applied to a built model from here.
"""

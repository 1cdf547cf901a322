"""Training data: pretraining text sources -> documents (`corpus`), documents -> packed token shards and the
resumable batch loader over them (`shards`); verifiable tasks, prompt files and rewards for SFT, GRPO and
eval (`tasks`)."""

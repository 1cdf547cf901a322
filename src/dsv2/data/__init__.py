"""Training data: text sources -> documents (`corpus`), documents -> packed token shards and the resumable
batch loader over them (`shards`) for pretraining; chat conversations -> padded batches with the loss on the
assistant's replies (`sft`) for supervised fine-tuning; verifiable tasks, prompt files and rewards for SFT,
GRPO and eval (`tasks`)."""

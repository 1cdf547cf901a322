"""Pretraining data: text sources -> documents (`corpus`), documents -> packed token shards and the
resumable batch loader over them (`shards`)."""

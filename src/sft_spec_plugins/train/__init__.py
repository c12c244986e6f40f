"""Train: formatting conversations, making the loss mask, and running TRL's SFTTrainer."""

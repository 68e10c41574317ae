"""Training and fine-tuning of Talker-T2AV (see README.md, section Training)."""

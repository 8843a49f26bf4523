"""What every training command shares: set-up, torchrun processes, FSDP2 sharding, mixed precision, the optimizer."""

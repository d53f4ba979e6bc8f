"""The SDK's promises for training frameworks that write their own checkpoints (optional extras: each submodule
imports its framework, the SDK core never does).

- `ckpt_sdk.integrations.transformers`: `CheckpointCallback`, `last_checkpoint` (Hugging Face `Trainer`)
- `ckpt_sdk.integrations.lightning`: `CheckpointCallback`, `CheckpointIO`, `last_checkpoint` (PyTorch Lightning)
- `ckpt_sdk.integrations.accelerate`: `save_state`, `load_state` (Hugging Face Accelerate)
- `ckpt_sdk.integrations.tensorboard`: `SummaryWriter` (TensorBoard curves that continue across attempts)
- `ckpt_sdk.integrations.dcp`: `CheckpointReader` (our checkpoints read by `torch.distributed.checkpoint.load`)
"""

__all__: list[str] = []

"""LoRA training of a (possibly 4-bit) base model on a formatted benchmark's train split.

    from expert.train import TrainConfig, train, list_checkpoints
    summary = train(TrainConfig(epochs=2), model_dir, data_dir, out_dir, work_dir)
    for step, adapter in list_checkpoints(out_dir): ...

Modules: `config` (TrainConfig), `data` (tokenize, mask, length-bucketed batches), `lora`
(LoRA wrapping, optimizer, schedule), `memory` (micro-batch and checkpointing, given or 'auto'),
`step` (one optimizer step, dev loss), `loop` (the run), `checkpoint` (save, load, verify),
`resume` (which checkpoint and precision a restarted run resumes with), `logging` (progress bar,
callback, TensorBoard, JSONL, loss plot), `distributed` (what changes on several processes: ddp,
fsdp), `launch` (torchrun from the stage, failures as ExpertError), `worker` (torchrun's entry point).
"""

from expert.train.config import TrainConfig

__all__ = ["TrainConfig", "train", "list_checkpoints"]


def __getattr__(name: str):
    # The run needs torch and PEFT (seconds to import); reading a config does not.
    if name in ("train", "list_checkpoints"):
        from expert.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'expert.train' has no attribute {name!r}")

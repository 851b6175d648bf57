"""The training run: load, wrap with LoRA, step, checkpoint, resume, write the outputs.

    summary = train(TrainConfig(), model_dir, data_dir, out_dir, work_dir)

`work_dir` outlives a crash: checkpoints, train_log.jsonl and tensorboard/ are written there
as the run goes, and a restarted run resumes from the last complete checkpoint that reads back
whole (`expert.train.resume`) with the same data order, precision, optimizer, schedule and RNG,
so it ends with the same adapter an uninterrupted run would have (bit for bit on CPU). Only at
the end is `out_dir` filled: every checkpoint, final/ (the last adapter), the logs, loss.png and
summary.json.

With `processes` > 1, `train` starts that many ranks with torchrun (`expert.train.launch`),
each of which runs `run_rank`; rank 0 alone writes work_dir and out_dir, in the same formats.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import statistics
from pathlib import Path

import torch

from expert.artifacts import MANIFEST
from expert.errors import DataError, ExpertError
from expert.gptq_kernel import layer_kernel
from expert.modeling import resolve_device
from expert.train.checkpoint import (ADAPTER_FILES, complete_checkpoints, load_checkpoint, rank_rng, read_state,
                                     save_checkpoint, set_aside, verify_checkpoint)
from expert.train.config import TrainConfig
from expert.train.data import (BUCKET_BATCHES, BatchPlan, EncodedSplit, encode_split, read_split, step_sizes,
                                unbucketed_padding_fraction)
from expert.train.distributed import Ranks, shard_base
from expert.train.frozen import cast_frozen_linears, dense_gptq_bytes, dense_gptq_layers
from expert.train.logging import Progress, QuietLogger, TrainLogger, log, plot_loss
from expert.train.lora import attach_lora, make_optimizer, make_scheduler, name_base
from expert.train.memory import MemoryPlan, out_of_memory_error, plan_memory
from expert.train.recompute import set_checkpointing
from expert.train.resume import pick_checkpoint, resumed_precision
from expert.train.step import Runner, autocast_dtype


def train(config: TrainConfig, model_dir: Path, data_dir: Path, out_dir: Path, work_dir: Path,
          progress: Progress | None = None, device: str = "auto") -> dict:
    """Train a LoRA adapter on data_dir/train.parquet; returns a small summary (see summary.json)."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(work_dir):  # before the model load, so a second run fails at once
        if config.processes > 1:
            from expert.train.launch import launch

            return launch(config, Path(model_dir), Path(data_dir), Path(out_dir), work_dir, progress, device)
        return _train(config, Path(model_dir), Path(data_dir), Path(out_dir), work_dir, progress, device)


def run_rank(config: TrainConfig, model_dir: Path, data_dir: Path, out_dir: Path, work_dir: Path,
             progress: Progress | None, device: str, ranks: Ranks) -> dict | None:
    """One rank of a run on several processes (torchrun's worker); the summary on rank 0, else None."""
    Path(work_dir).mkdir(parents=True, exist_ok=True)  # `train` made it; a worker started by hand may not have
    return _train(config, Path(model_dir), Path(data_dir), Path(out_dir), Path(work_dir), progress, device, ranks)


def _store_name(model_dir: Path) -> str:
    """What the saved adapters call their base: an artifact's place in the store ("quantize/KEY"),
    not the store's absolute path. With the path in adapter_config.json and README.md, the train
    artifact's content, and so the keys of selection, the expert's evaluations and the report,
    depended on where the store lived: the same run in a moved store or another checkout rebuilt
    all of them. A folder outside the store keeps its path."""
    if (model_dir / MANIFEST).is_file():
        return f"{model_dir.parent.name}/{model_dir.name}"
    return str(model_dir)


def _train(config: TrainConfig, model_dir: Path, data_dir: Path, out_dir: Path, work_dir: Path,
           progress: Progress | None, device: str, ranks: Ranks = Ranks()) -> dict | None:
    rows = read_split(data_dir / "train.parquet")  # data first: a missing file fails before a long load
    dev_rows = _dev_rows(data_dir / "dev.parquet") if config.dev_loss else None
    # What to resume from, and in which precision, before the long load: a refusal comes at once.
    picked = pick_checkpoint(work_dir / "checkpoints", config, ranks)
    torch_device = resolve_device(device)
    precision = resumed_precision(config, torch_device, picked)
    amp = autocast_dtype(precision, torch_device)
    model, tokenizer = _load_base(model_dir, device, config.strategy, config.gptq_kernel)
    kernel = layer_kernel(model)  # gptqmodel's GPTQ layers, None for other bases
    if torch_device.type == "cpu" and ranks.strategy != "fsdp" and _dense_gptq(model, amp or model.dtype, ranks):
        kernel += ", dequantized once into frozen linear layers"
    if kernel and ranks.main:
        log.info("GPTQ base served by gptqmodel's %s (train.gptq_kernel %s)", kernel, config.gptq_kernel)
    train_set = _encode(tokenizer, rows, config.max_length, ranks)
    dev_set = encode_split(tokenizer, dev_rows, config.max_length) if dev_rows else None
    torch.manual_seed(config.seed)  # LoRA init; a resume overwrites weights and RNG from the checkpoint
    model = attach_lora(model, config)
    name_base(model, _store_name(model_dir))
    if ranks.strategy != "fsdp":  # FSDP flattens the base's weights into shards of one dtype: leave them
        cast_frozen_linears(model, amp)
    model.train()
    ranks.same_weights([p for p in model.parameters() if p.requires_grad])
    ranks.seed_dropout(config.seed)
    if ranks.strategy == "fsdp":
        shard_base(model, ranks, device)
    answers = max(e.answer_tokens for e in train_set.examples)
    saved = read_state(picked[1]) if picked else None
    memory = _memory_plan(saved, config, model, train_set.lengths, answers, ranks)
    micro = memory.micro_batch_size
    # A resumed run keeps its data order: its checkpoint's bucket size (older ones: the only one there was)
    plan = BatchPlan(train_set.lengths, step_sizes(config.effective_batch_size, micro, config.processes),
                     config.epochs, config.seed, config.max_steps,
                     saved.get("bucket_batches", BUCKET_BATCHES) if saved is not None else None)
    if ranks.main:
        log.info("%d training examples, %d optimizer steps of %d micro-batches of %s (gradient checkpointing "
                 "%s%s); padding fraction %.3f", len(train_set.examples), plan.total_steps, plan.accum,
                 plan.micro_text, memory.checkpointing_text,
                 f"; {ranks.world} processes, {ranks.strategy}" if ranks.many else "", plan.padding_fraction())
    optimizer = make_optimizer(config, model)
    scheduler = make_scheduler(config, optimizer, plan.total_steps)
    state = _resume(picked, model, optimizer, scheduler, ranks)
    state["memory"] = memory.as_dict()
    state["bucket_batches"] = plan.bucket_batches
    state["precision"] = precision
    state["gptq_kernel"] = kernel  # this attempt's: a resume on another machine may load another
    runner = Runner(model, optimizer, scheduler, train_set, _pad_id(tokenizer), config.max_grad_norm, ranks,
                    precision)
    if ranks.main:
        log.info("matmuls in %s (train.precision %s)", runner.precision_name, config.precision)
    logger = TrainLogger(work_dir, plan.total_steps, state["step"], config.log_every_steps, runner.device, progress,
                         state.get("log_window")) if ranks.main else QuietLogger(plan.total_steps, progress)
    try:
        _run(config, runner, plan, state, logger, dev_set, work_dir)
    except torch.cuda.OutOfMemoryError:
        limit = memory.limit_gib and int(memory.limit_gib * 2**30)
        raise out_of_memory_error(config, limit, f"micro-batches of {plan.micro} examples of up to "
                                  f"{max(train_set.lengths)} tokens") from None
    finally:
        logger.close()
    if not ranks.main:
        return None
    return _finish(config, work_dir, out_dir, state, plan, train_set, dev_set, logger.records, runner)


@contextlib.contextmanager
def _exclusive(work_dir: Path):
    """One run per work_dir at a time: two would overwrite each other's checkpoints and logs.

    An advisory lock (flock) rather than a lock file's existence: the OS drops it when its
    process dies, kill -9 included, so a crashed run never blocks its own restart.
    """
    try:
        import fcntl
    except ImportError:  # Windows has no flock; there, do not start two runs on one folder
        yield
        return
    with open(work_dir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExpertError(f"another training run is using {work_dir} (it holds {work_dir / '.lock'}); "
                              "wait for it to finish or stop it, then run again") from None
        yield


def _run(config: TrainConfig, runner: Runner, plan: BatchPlan, state: dict, logger: TrainLogger,
         dev_set: EncodedSplit | None, work_dir: Path) -> None:
    """Optimizer steps from state["step"] to the end, checkpointing every save_every_steps."""
    if state["step"]:
        logger.done(state["step"])
    for step in range(state["step"], plan.total_steps):
        loss, tokens, seconds, grad_norm, lr = runner.step(plan.step(step))
        done = step + 1
        state.update(step=done, tokens=state["tokens"] + tokens, last_loss=loss,
                     train_seconds=state["train_seconds"] + seconds)
        logger.step(done, plan.epoch_after(done), loss, lr, tokens, seconds, grad_norm)
        if done % config.save_every_steps == 0 or done == plan.total_steps:
            _checkpoint(work_dir, config, runner, dev_set, logger, state, plan)
        logger.done(done)  # after the checkpoint, so a callback that sees step k may rely on its checkpoint


def _encode(tokenizer, rows: dict[str, list[str]], max_length: int, ranks: Ranks) -> EncodedSplit:
    split = encode_split(tokenizer, rows, max_length)
    if split.truncated and ranks.main:
        log.warning("%d of %d training prompts were cut on the left to fit max_length=%d (e.g. ids %s)",
                    split.truncated, len(split.examples), max_length, split.truncated_ids)
    return split


def _memory_plan(saved: dict | None, config: TrainConfig, model, lengths: list[int], answers: int,
                 ranks: Ranks) -> MemoryPlan:
    """The resumed checkpoint's own choice (`saved`: its state; the data order depends on it), else
    a fresh one."""
    if saved and saved.get("memory"):
        plan = MemoryPlan.from_dict(saved["memory"])
        set_checkpointing(model, plan.gradient_checkpointing, plan.recomputed_layers)
        return plan
    device = next(p for p in model.parameters() if p.requires_grad).device
    return plan_memory(model, config, max(lengths), device, ranks, answer_tokens=answers,
                       typical=int(statistics.median(lengths)))


def _dev_rows(path: Path) -> dict[str, list[str]]:
    if not path.is_file():
        raise DataError(f"{path} does not exist; the dev loss needs it. Format the data again, "
                        "or set train.dev_loss: false")
    return read_split(path)


def _load_base(model_dir: Path, device: str, strategy: str, gptq_kernel: str = "auto"):
    """The shared loader: plain, GPTQ or nf4 folders, with settings safe for training.

    For fsdp a plain base is loaded into CPU memory (in the dtype its GPU would get) and only
    its shards move to the GPU; an nf4 base is quantized on the rank's GPU, stored as the
    compute dtype so that FSDP can shard it (the 4-bit model must fit one card while loading).
    """
    from expert.modeling import load_model, model_kind, resolve_base, resolve_dtype

    if strategy != "fsdp" or model_kind(model_dir) == "nf4":
        return load_model(model_dir, training=True, device=device, shardable=strategy == "fsdp",
                          gptq_kernel=gptq_kernel)
    dtype = resolve_dtype("auto", resolve_device(device), resolve_base(model_dir))
    return load_model(model_dir, training=True, device="cpu", dtype=str(dtype).removeprefix("torch."))


def _dense_gptq(model, dtype: torch.dtype, ranks: Ranks) -> bool:
    """A GPTQ base on the CPU, dequantized once where that fits half the available memory (frozen.py).
    Whether it was."""
    from expert.modeling import available_memory

    needed = dense_gptq_bytes(model, dtype)
    if not needed:
        return False
    if needed > available_memory() // 2:
        if ranks.main:
            log.info("GPTQ base kept 4-bit: its weights dequantized once would take %.1f GiB, more than half the "
                     "available memory; each step dequantizes them again instead", needed / 2**30)
        return False
    layers, size = dense_gptq_layers(model, dtype)
    if ranks.main:
        log.info("GPTQ base on the CPU: %d layers dequantized once into %s (%.2f GiB), not on every step",
                 layers, str(dtype).removeprefix("torch."), size / 2**30)
    return True


def _pad_id(tokenizer) -> int:
    # Pad positions are masked out and never scored, so any valid id does.
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


def _fresh_state() -> dict:
    return {"step": 0, "tokens": 0, "train_seconds": 0.0, "last_loss": None, "dev_losses": {}, "resumed_from": []}


def _resume(picked: tuple[int, Path] | None, model, optimizer, scheduler, ranks: Ranks) -> dict:
    """Restore the checkpoint `pick_checkpoint` chose, if any; else a fresh state."""
    if picked is None:
        return _fresh_state()
    step, path = picked
    state = load_checkpoint(path, model, optimizer, scheduler, ranks.rank)
    state["resumed_from"] = [*state.get("resumed_from", []), step]
    if "precision" not in state:  # written by a version that did not record it: summary.json says so
        state.setdefault("precision_unrecorded_steps", step)
    if ranks.main:
        log.info("resuming from checkpoint %s (step %d)", path, step)
    return state


def _checkpoint(work_dir: Path, config: TrainConfig, runner: Runner, dev_set: EncodedSplit | None,
                logger: TrainLogger, state: dict, plan: BatchPlan) -> None:
    step = state["step"]
    dev = runner.dev_loss(dev_set, plan.micro * 2) if dev_set else None
    if dev is not None:
        state["dev_losses"][str(step)] = dev
        logger.dev(step, dev)
    state["log_window"] = logger.pending()  # absent from older checkpoints: their resume starts it empty
    marker = {"config": config.canonical(), "epoch": plan.epoch_after(step), "train_loss": state["last_loss"],
              "dev_loss": dev}
    ranks = runner.ranks
    rng = ranks.gather(rank_rng(ranks.rank)) if ranks.many else None  # each rank's dropout stream
    ranks.settle(runner.model)
    if ranks.main:
        save_checkpoint(work_dir / "checkpoints", step, runner.model, runner.optimizer, runner.scheduler, state,
                        marker, rng and {k: v for states in rng for k, v in states.items()})


def list_checkpoints(train_dir: Path) -> list[tuple[int, Path]]:
    """(step, adapter folder) of the complete checkpoints of a train output (or work) folder."""
    return complete_checkpoints(Path(train_dir) / "checkpoints")


def _finish(config: TrainConfig, work_dir: Path, out_dir: Path, state: dict, plan: BatchPlan,
            train_set: EncodedSplit, dev_set: EncodedSplit | None, records: list[dict], runner: Runner) -> dict:
    """Copy checkpoints, final adapter and logs into out_dir; write loss.png and summary.json."""
    found = _sound_checkpoints(list_checkpoints(work_dir))
    if not found or found[-1][0] != plan.total_steps:
        raise RuntimeError(f"training in {work_dir} did not reach its last step {plan.total_steps}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for _, path in found:
        shutil.copytree(path, out_dir / "checkpoints" / path.name, dirs_exist_ok=True)
    (out_dir / "final").mkdir(exist_ok=True)
    for name in ADAPTER_FILES:
        shutil.copy2(found[-1][1] / name, out_dir / "final" / name)
    shutil.copy2(work_dir / "train_log.jsonl", out_dir / "train_log.jsonl")
    shutil.copytree(work_dir / "tensorboard", out_dir / "tensorboard", dirs_exist_ok=True)
    plot_loss(records, out_dir / "loss.png")
    summary = _summary(config, state, plan, train_set, dev_set, runner, [p.name for _, p in found])
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    log.info("trained %d steps (%.2f epochs) in %.0f s, final loss %.4f; adapter in %s", summary["steps"],
             summary["epochs"], summary["train_seconds"], summary["final_loss"], out_dir / "final")
    return short_summary(summary)


def _sound_checkpoints(found: list[tuple[int, Path]]) -> list[tuple[int, Path]]:
    """The checkpoints that read back whole. Selection scores every one, and an earlier one may
    have been damaged since it was written (a resumed run wrote it before a crash): it is set
    aside with a warning rather than copied into the outputs (the last one is checked too, and
    then missing, which stops the run: a rerun resumes from the one before it)."""
    sound = []
    for step, path in found:
        problem = verify_checkpoint(path)
        if problem is None:
            sound.append((step, path))
            continue
        log.warning("checkpoint %s is damaged (%s): moved it to %s and left it out of the outputs",
                    path, problem, set_aside(path).name)
    return sound


def short_summary(summary: dict) -> dict:
    """What `train` returns: the headline numbers of summary.json."""
    return {k: summary[k] for k in ("steps", "epochs", "final_loss", "final_dev_loss", "tokens_per_s",
                                    "padding_fraction", "train_seconds", "truncated")}


def _summary(config, state, plan, train_set, dev_set, runner, checkpoints) -> dict:
    trainable = sum(p.numel() for p in runner.params)
    dev_losses = state["dev_losses"]
    return {
        "steps": state["step"],
        "epochs": plan.epoch_after(state["step"]),
        "examples": len(train_set.examples),
        "dev_examples": len(dev_set.examples) if dev_set else 0,
        "truncated": train_set.truncated,
        "truncated_ids": train_set.truncated_ids,
        "train_seconds": state["train_seconds"],
        "tokens": state["tokens"],
        "tokens_per_s": state["tokens"] / max(state["train_seconds"], 1e-9),
        "padding_fraction": plan.padding_fraction(),
        "padding_fraction_unbucketed": unbucketed_padding_fraction(train_set.lengths, plan.micro, config.seed),
        "micro_batch_size": plan.micro,
        "step_micro_batches": plan.sizes,  # one optimizer step's micro-batch sizes (uneven under 'auto')
        "memory": state.get("memory"),
        "final_loss": state["last_loss"],
        "dev_loss": dev_losses,
        "final_dev_loss": dev_losses.get(str(state["step"])),
        "checkpoints": checkpoints,
        "trainable_params": trainable,
        "resumed_from": state["resumed_from"],
        "device": str(runner.device),
        "gptq_kernel": state.get("gptq_kernel"),  # of the last attempt; None for other bases
        "precision": _precision_text(runner.precision_name, state.get("precision_unrecorded_steps")),
    }


def _precision_text(name: str, unrecorded: int | None) -> str:
    """What the matmuls computed in, over the whole run: a resume pins it (expert.train.resume),
    except from a checkpoint of an older version, which did not record its own."""
    if not unrecorded:
        return name
    return f"{name} from step {unrecorded + 1} (steps 1-{unrecorded}: not recorded)"

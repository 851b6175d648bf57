"""One rank of a training run on several processes, as torchrun starts it.

    python -m torch.distributed.run --nproc-per-node 2 ... -m expert.train.worker work/launch.json

`expert.train.launch` writes launch.json (config, folders, device) and runs that command;
there is no reason to start this module by hand. `@record` writes a failing rank's traceback
to the error file torchrun names, so the launcher can say which rank failed and why.

A rank ends with `os._exit` once its work is done (or has failed), after the atexit handlers and
a flush: skipping the interpreter's finalization, where a C++ thread (gloo's, or a library's)
that still wants the GIL is ended by CPython 3.11 with pthread_exit and aborts the process
("terminate called without an active exception", SIGABRT). Seen once in CI, with no Python frame
left in the report (the interpreter was finalizing): torchrun then reported the run failed.

Fault injection for the tests: `EXPERT_TRAIN_KILL=RANK:STEP` in the environment makes that
rank SIGKILL itself once optimizer step STEP is done (read here only, never by the library).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from torch.distributed.elastic.multiprocessing.errors import record

PROGRESS = "expert-train-progress"  # rank 0's progress lines, which the launcher turns into callbacks
KILL_ENV = "EXPERT_TRAIN_KILL"


@record
def main(argv: list[str] | None = None) -> None:
    from expert.train.config import TrainConfig
    from expert.train.distributed import Ranks
    from expert.train.loop import run_rank

    spec = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    config = TrainConfig.from_dict(spec["config"], where="train")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("expert").addHandler(handler)
    logging.getLogger("expert").setLevel(logging.INFO)
    logging.getLogger("expert").propagate = False  # a library may have configured the root logger too
    ranks, device = Ranks.from_env(config.strategy, spec["device"])
    try:
        run_rank(config, spec["model_dir"], spec["data_dir"], spec["out_dir"], spec["work_dir"],
                 _progress(ranks.rank), device, ranks)
    finally:
        ranks.close()


def _progress(rank: int):
    kill = os.environ.get(KILL_ENV, "")
    victim, _, after = kill.partition(":")

    def progress(done: int, total: int) -> None:
        if rank == 0:
            print(f"{PROGRESS} {done} {total}", flush=True)
        if kill and rank == int(victim) and done == int(after):
            os.kill(os.getpid(), signal.SIGKILL)

    return progress


def run_and_exit(entry: Callable[[], None]) -> NoReturn:
    """Run `entry`, then end the process without finalizing the interpreter: 0 if it returned, 1
    (its traceback printed; @record has written the error file torchrun reads) if it raised, a
    SystemExit's own code."""
    code = 0
    try:
        entry()
    except SystemExit as exc:  # its own code, as a plain exit would give
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:  # noqa: BLE001 (a KeyboardInterrupt ends the rank as a failure too)
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # what a normal exit runs first (temporary folders, compile workers)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run_and_exit(main)

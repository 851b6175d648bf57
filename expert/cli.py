"""The `expert` command line.

    expert run CONFIG [--set key=value ...] [--force STAGE]   the cached Prefect pipeline
    expert params CONFIG [--set key=value ...] [--force STAGE] the same, as deployment parameters (JSON)
    expert import-model --source SRC --out DIR        gguf:FILE | hf:ORG/NAME | DIR | embedded:NAME
    expert format pubmedqa --source FILE_OR_URL --out DIR [--fold K]
    expert format mmlu --source DIR_OR_HF --out DIR
    expert eval --model DIR [--adapter DIR] --benchmark pubmedqa|mmlu --data DIR --out DIR [--set key=value]
                [--no-resume]
    expert export SELECT_DIR --out DIR [--merge [--dtype D]]   the chosen expert as one portable folder
    expert verify PATH ...                            check artifacts fully against their manifests
    expert clean [PATH ...] [--older-than DAYS] [--dry-run]   remove unfinished builds' leftovers

A failure prints one paragraph and exits non-zero (2 for a problem with the input, 1 for
anything unexpected); `--debug` shows the traceback.

`expert eval` keeps each scored MMLU subject in a hidden `.OUT.work-KEY` folder beside --out, KEY
naming the content of the model, adapter and data folders and the eval settings, so the same
command after a crash scores only the subjects still missing. The folder is deleted once the
outputs are written; `--no-resume` deletes it first; `expert clean DIR` removes such folders in DIR
(not one a running `expert eval` holds).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

from expert.errors import ExpertError

PREFECT_DEFAULTS = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "expert",
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.handler(args)
        return 0
    except ExpertError as exc:
        _fail(str(exc), args.debug)
        return 2
    except KeyboardInterrupt:
        print("interrupted; completed stages are kept and will be reused", file=sys.stderr)
        return 130
    except Exception as exc:  # the last resort: one paragraph instead of a traceback
        _fail(f"unexpected {type(exc).__name__}: {exc}. Rerun with --debug for the traceback.", args.debug)
        return 1


def _fail(message: str, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    print(f"expert: error: {message}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    # --debug goes before or after the command: the commands' copy has no default of its own,
    # which would otherwise overwrite a --debug given before the command with False.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")
    parser = argparse.ArgumentParser(prog="expert", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", parents=[common], help="run the cached pipeline flow")
    run.add_argument("config", help="YAML preset, e.g. configs/default.yaml")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field, e.g. --set data.pubmedqa.fold=3 (repeatable)")
    run.add_argument("--force", action="append", default=[], metavar="STAGE",
                     help="recompute STAGE and everything after it, even if cached (repeatable), e.g. --force train")
    run.set_defaults(handler=cmd_run)

    par = sub.add_parser("params", parents=[common],
                         help="print a config as deployment parameters (for prefect deploy/deployment run --params)")
    par.add_argument("config", help="YAML preset, e.g. configs/default.yaml")
    par.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    par.add_argument("--force", action="append", default=[], metavar="STAGE")
    par.add_argument("--evaluate", action="store_true",
                     help="parameters of the evaluation-only flow (data, evaluation, artifacts_dir) instead")
    par.set_defaults(handler=cmd_params)

    imp = sub.add_parser("import-model", parents=[common], help="import a base model as a standard HF folder")
    imp.add_argument("--source", required=True, help="gguf:FILE, hf:ORG/NAME, a local HF folder, or embedded:NAME")
    imp.add_argument("--out", required=True, type=Path)
    imp.add_argument("--revision", help="hub revision for hf: sources")
    imp.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    imp.add_argument("--trust-remote-code", action="store_true", help="allow a model's own Python code to run")
    imp.set_defaults(handler=cmd_import_model)

    fmt = sub.add_parser("format", parents=[common], help="format a benchmark's data to Parquet")
    fsub = fmt.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    pq = fsub.add_parser("pubmedqa", parents=[common], help="PubMedQA PQA-L -> train/dev/test.parquet")
    pq.add_argument("--source", required=True, help="ori_pqal.json path or URL, or hf:qiaojin/PubMedQA")
    pq.add_argument("--out", required=True, type=Path)
    pq.add_argument("--fold", type=int, default=0, help="CV fold of the official split (0-9)")
    pq.add_argument("--template", default=None, help="prompt template name")
    pq.add_argument("--extra-train", default=None, help="optional PQA-A ori_pqaa.json added to train")
    pq.add_argument("--tokenizer", type=Path, default=None, help="model folder whose tokenizer sets the budget")
    pq.add_argument("--max-prompt-tokens", type=int, default=None, help="token budget of train prompts (prompt + answer + EOS): cuts the end of long abstracts; dev and test keep theirs whole")
    pq.set_defaults(handler=cmd_format_pubmedqa)
    mm = fsub.add_parser("mmlu", parents=[common], help="MMLU -> dev/test.parquet (k-shot prompts, 5 by default)")
    mm.add_argument("--source", required=True, help="folder in the original CSV layout, or hf:cais/mmlu")
    mm.add_argument("--out", required=True, type=Path)
    mm.add_argument("--num-shots", type=int, default=None, help="dev questions per prompt (default 5)")
    mm.set_defaults(handler=cmd_format_mmlu)

    ev = sub.add_parser("eval", parents=[common], help="evaluate a model folder (+ adapter) on a benchmark")
    ev.add_argument("--model", required=True, type=Path)
    ev.add_argument("--adapter", type=Path, default=None)
    ev.add_argument("--benchmark", required=True, choices=["pubmedqa", "mmlu"])
    ev.add_argument("--data", required=True, type=Path, help="folder written by `expert format`")
    ev.add_argument("--out", required=True, type=Path)
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override an eval config field, e.g. --set mmlu_max_per_subject=20")
    ev.add_argument("--no-resume", action="store_true",
                    help="score every MMLU subject anew: delete what an interrupted run with these inputs kept")
    ev.set_defaults(handler=cmd_eval)

    exp = sub.add_parser("export", parents=[common],
                         help="write the selected expert (base, adapter, model card) as one portable folder")
    exp.add_argument("select", type=Path, metavar="SELECT_DIR",
                     help="the select stage's artifact, artifacts/select/<key> (the report names it), its "
                          "adapter/ folder, or the report, artifacts/report/<key>")
    exp.add_argument("--out", required=True, type=Path)
    exp.add_argument("--merge", action="store_true",
                     help="fold the adapter into the base's weights: one plain transformers model (model/)")
    exp.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="the merged model's dtype (auto: the base checkpoint's); only with --merge")
    exp.set_defaults(handler=cmd_export)

    ver = sub.add_parser("verify", parents=[common], help="check artifacts against their manifests, every byte")
    ver.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                     help="an artifact folder, a stage folder (artifacts/train) or the artifacts root")
    ver.set_defaults(handler=cmd_verify)

    cl = sub.add_parser("clean", parents=[common],
                        help="remove what unfinished builds left in the store (resumable work, crash debris)")
    cl.add_argument("paths", nargs="*", type=Path, metavar="PATH",
                    help="the artifacts root (default: $EXPERT_ARTIFACTS or ./artifacts), a stage folder, "
                         "or a folder holding `expert eval` outputs")
    cl.add_argument("--older-than", type=float, default=0.0, metavar="DAYS",
                    help="only what was last written over DAYS days ago (default: all of it)")
    cl.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    cl.set_defaults(handler=cmd_clean)
    return parser


def cmd_run(args: argparse.Namespace) -> None:
    from expert.pipeline_config import check_local_sources, check_stage_names, load_config

    config = load_config(args.config, args.overrides)  # fail fast, before Prefect starts
    force = check_stage_names(args.force)
    check_local_sources(config)  # a typo in a data path, before the model is downloaded and imported
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))
    from flows.pipeline import pipeline  # imports prefect: only now that the env is set
    from flows.hangup import stop_on_hangup
    from flows.quiet_errors import user_errors_without_traceback
    from flows.temporary_server import detach_temporary_server

    detach_temporary_server()  # a Ctrl-C then stops the run, not the server that records it
    stop_on_hangup()  # a closed terminal stops it as SIGTERM does: recorded as crashed
    if not args.debug:
        user_errors_without_traceback()
    result = pipeline(config=config, force=force)
    print(json.dumps(result, indent=2))
    print(f"to take the expert out of the store: expert export {Path(result['expert']['adapter']).parent} "
          "--out DIR", file=sys.stderr)


def cmd_params(args: argparse.Namespace) -> None:
    """The flow's parameters as JSON: `prefect deployment run ... --params "$(expert params CONFIG)"`."""
    from expert.pipeline_config import check_stage_names, load_config

    config = load_config(args.config, args.overrides)
    if args.evaluate:
        dump = config.model_dump(mode="json")
        params = {"data": dump["data"], "evaluation": dump["eval"], "artifacts_dir": dump["artifacts_dir"]}
    else:
        params = {"config": config.model_dump(mode="json"), "force": check_stage_names(args.force)}
    print(json.dumps(params))


def cmd_import_model(args: argparse.Namespace) -> None:
    from expert.models import ModelConfig, import_model, resolve_model_source

    with _said_as_flags("model", {"source": "--source", "revision": "--revision", "dtype": "--dtype",
                                  "trust_remote_code": "--trust-remote-code"}):
        config = ModelConfig.from_dict({"source": args.source, "revision": args.revision, "dtype": args.dtype,
                                        "trust_remote_code": args.trust_remote_code}, source="import-model")
        _check_out(args.out)
        workspace = _workspace()
        resolved = resolve_model_source(config, cache_dir=workspace.downloads / "models",
                                        fingerprints=workspace.fingerprints)
        _write_into(args.out, lambda tmp: import_model(config, resolved, tmp))


def cmd_format_pubmedqa(args: argparse.Namespace) -> None:
    from expert.benchmarks.pubmedqa import PubMedQAConfig, format_pubmedqa
    from expert.sources import fetch

    raw = {"source": args.source, "fold": args.fold, "template": args.template,
           "extra_train_source": args.extra_train, "max_prompt_tokens": args.max_prompt_tokens}
    with _said_as_flags("data.pubmedqa", {"source": "--source", "fold": "--fold", "template": "--template",
                                          "extra_train_source": "--extra-train",
                                          "max_prompt_tokens": "--max-prompt-tokens"}):
        config = PubMedQAConfig.from_dict({k: v for k, v in raw.items() if v is not None}, source="format pubmedqa")
        _check_out(args.out)
        tokenizer = None if args.tokenizer is None else _tokenizer(args.tokenizer)
        workspace = _workspace()
        source = fetch(config.source, workspace.downloads, workspace.fingerprints)
        extra = fetch(args.extra_train, workspace.downloads, workspace.fingerprints) if args.extra_train else None
        _write_into(args.out, lambda tmp: format_pubmedqa(config, source.path, tmp, tokenizer=tokenizer,
                                                          extra_source=extra.path if extra else None))


def cmd_format_mmlu(args: argparse.Namespace) -> None:
    from expert.benchmarks.mmlu import MMLUConfig, format_mmlu
    from expert.sources import fetch

    raw = {"source": args.source, "num_shots": args.num_shots}
    with _said_as_flags("data.mmlu", {"source": "--source", "num_shots": "--num-shots"}):
        config = MMLUConfig.from_dict({k: v for k, v in raw.items() if v is not None}, source="format mmlu")
        _check_out(args.out)
        workspace = _workspace()
        source = fetch(config.source, workspace.downloads, workspace.fingerprints)
        _write_into(args.out, lambda tmp: format_mmlu(config, source.path, tmp))


def cmd_eval(args: argparse.Namespace) -> None:
    from expert.artifacts import lock_for
    from expert.evaluation import EvalConfig, evaluate
    from expert.evaluation.resume import FOLDER
    from expert.locks import exclusive
    from expert.pipeline_config import apply_override

    raw: dict[str, Any] = {}
    for item in args.overrides:  # `batch_size=4`, or as `expert run` spells it, `eval.batch_size=4`
        apply_override(raw, item.removeprefix("eval."))
    config = EvalConfig.from_dict(raw, where="eval")
    for role, path in (("--model", args.model), ("--data", args.data), ("--adapter", args.adapter)):
        if path is not None and not path.is_dir():
            raise ExpertError(f"{role} '{path}' is not a folder")
    _check_out(args.out)  # the adapter folder is checked by the loader, before the model loads
    # Only MMLU resumes (PubMedQA's batches span the split); its key reads the folders' content.
    work = _eval_work_dir(args, config) if args.benchmark == "mmlu" else None
    # While it runs, the work folder's lock tells `expert clean` (and a second `expert eval` of the
    # same command, which waits) that it is in use.
    with exclusive(lock_for(work), f"evaluating into {args.out}") if work is not None else contextlib.nullcontext():
        if work is not None and args.no_resume:
            shutil.rmtree(work, ignore_errors=True)
        kept = len(list((work / FOLDER).glob("*.json"))) if work is not None else 0
        if kept:  # the runner logs this at INFO, which the command line does not show
            print(f"resuming: {kept} MMLU subject(s) scored by an earlier attempt are kept in {work} "
                  "(--no-resume scores them again)", file=sys.stderr)
        metrics = _write_into(args.out, lambda tmp: evaluate(config, args.benchmark, model_dir=args.model,
                                                              data_dir=args.data, out_dir=tmp,
                                                              adapter_dir=args.adapter, work_dir=work))
        if work is not None:  # the outputs are in place: nothing is left to resume
            shutil.rmtree(work, ignore_errors=True)
    keys = ("accuracy", "macro_f1", "average", "subject_mean", "n")
    print(json.dumps({k: metrics[k] for k in keys if k in metrics}, indent=2))


def _eval_work_dir(args: argparse.Namespace, config) -> Path:
    """The hidden folder beside --out where `evaluate` keeps each scored MMLU subject (resume.py).

    A kept subject is checked only for its question ids, device kind and dtype, so the folder is
    named by everything else that decides the scores, keyed as the pipeline's evaluate stage keys
    its artifacts: the benchmark's eval settings and the content of the model, adapter and data
    folders (new weights at the same path get another folder, never the old scores).
    """
    from expert.artifacts import WORK_PREFIX, StageRequest, content_id
    from expert.stages.evaluation import Evaluate

    workspace = _workspace()
    stage = Evaluate(args.benchmark)
    folders = {"model": args.model, "adapter": args.adapter, "data": args.data}
    # Not stage.request: it keys the data by its artifact manifest, which a folder written by
    # `expert format` lacks; folder_ref keys such a folder by its content instead.
    upstream = {role: content_id(workspace.folder_ref(path)) for role, path in folders.items() if path is not None}
    request = StageRequest(stage.name, stage.version, stage.key_config(config), upstream)
    return args.out.parent / f".{args.out.name}{WORK_PREFIX}{request.key}"


def cmd_export(args: argparse.Namespace) -> None:
    from expert.export import export_expert

    if not args.select.is_dir():
        raise ExpertError(f"'{args.select}' is not a folder; give the select stage's artifact, "
                          "artifacts/select/<key> (the report's 'Checkpoint selection' names it)")
    if args.dtype != "auto" and not args.merge:
        raise ExpertError(f"--dtype {args.dtype} applies to a merged model: add --merge, or leave --dtype out "
                          "(base and adapter are exported as they are stored)")
    _check_out(args.out)
    info = _write_into(args.out, lambda tmp: export_expert(args.select, tmp, merge=args.merge, dtype=args.dtype))
    print(json.dumps({"base": info["base"]["source"], "step": info["adapter"]["step"],
                      "results": info["results"]}, indent=2))


def cmd_verify(args: argparse.Namespace) -> None:
    from expert.artifacts import leftovers, verify_tree

    results = [result for path in args.paths for result in verify_tree(path)]
    for folder, problem in results:
        print(f"{'ok' if problem is None else 'BAD'}  {folder}" + (f": {problem}" if problem else ""))
    for folder, what, size in (item for path in args.paths for item in leftovers(path)):
        print(f"note  {folder} ({size / 2**20:,.1f} MiB): {what}")
    bad = [folder for folder, problem in results if problem]
    if bad:
        raise ExpertError(f"{len(bad)} of {len(results)} artifact(s) failed verification; delete them (the next "
                          "run rebuilds them) or restore them from a backup")


def cmd_clean(args: argparse.Namespace) -> None:
    from expert.cleanup import clean

    if args.older_than < 0:
        raise ExpertError(f"--older-than {args.older_than:g}: give a number of days, 0 or more")
    paths = args.paths or [_workspace().root]
    for path in paths:
        if not path.is_dir():
            raise ExpertError(f"'{path}' is not a folder; give the artifacts root, a stage folder (artifacts/train) "
                              "or the folder of an `expert eval --out`")
    total = 0
    for folder, size, outcome in (item for path in paths for item in clean(path, args.older_than, args.dry_run)):
        print(f"{outcome}  {folder} ({size / 2**20:,.1f} MiB)" + (": a running build holds it" if outcome == "in use"
                                                                  else ""))
        total += size if outcome != "in use" else 0
    verb = "would free" if args.dry_run else "freed"
    print(f"{verb} {total / 2**20:,.1f} MiB", file=sys.stderr)


@contextlib.contextmanager
def _said_as_flags(section: str, flags: dict[str, str]):
    """The library names config fields (`data.pubmedqa.fold`, `'fold'`); a command given flags
    says the flags the user typed (`--fold`)."""
    try:
        yield
    except ExpertError as exc:
        text = str(exc)
        for field, flag in flags.items():
            text = re.sub(rf"(?<![\w.]){re.escape(section)}\.{field}\b", flag, text)
            text = text.replace(f"'{field}'", f"'{flag}'")
        text = text.replace("no tokenizer was given: pass the model's tokenizer",
                            "no tokenizer was given: pass the model's tokenizer (--tokenizer MODEL_DIR)")
        raise type(exc)(text) from exc


def _workspace():
    from expert.workspace import Workspace

    return Workspace.at(os.environ.get("EXPERT_ARTIFACTS", "artifacts"))


def _check_out(out: Path) -> None:
    """--out must be a folder we can write into: said before the work, not after it."""
    if out.exists() and not out.is_dir():
        raise ExpertError(f"--out '{out}' is a file; give a folder (it is created if missing)")
    _temp_beside(out).rmdir()


def _temp_beside(out: Path) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise ExpertError(f"--out '{out}': cannot write in {out.parent} ({exc.strerror}); give a folder you "
                          "can write to") from None


def _tokenizer(folder: Path):
    """The tokenizer of a model folder given as --tokenizer, or a clear error naming it."""
    from transformers import AutoTokenizer

    from expert.hub import TOKENIZER_FILES

    if not folder.is_dir() or not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ExpertError(f"--tokenizer '{folder}' is not a model folder with a tokenizer (tokenizer.json, "
                          "tokenizer_config.json, ...); give an imported model folder, e.g. artifacts/import_model/KEY")
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ExpertError(f"--tokenizer '{folder}': its tokenizer does not load ({exc})") from None


def _write_into(out: Path, produce: Callable[[Path], Any]) -> Any:
    """Produce into a temp folder beside `out`, then move the files in: no half-written outputs.

    A new `out` appears whole, by one rename; into an existing one (other files kept) each file
    is replaced by a rename, so a crash between two can leave old and new files side by side.
    """
    holder = _temp_beside(out)
    tmp = holder / "out"  # made by mkdir, so the folder renamed into place has the usual permissions
    try:
        tmp.mkdir()
        result = produce(tmp)
        if not out.exists():
            os.replace(tmp, out)
            print(f"wrote {out}", file=sys.stderr)
            return result
        for item in sorted(tmp.iterdir()):
            target = out / item.name
            if target.is_dir() and not item.is_dir():
                shutil.rmtree(target)
            if item.is_dir() and target.exists():
                shutil.rmtree(target)
            os.replace(item, target)
        print(f"wrote {out}", file=sys.stderr)
        return result
    finally:
        shutil.rmtree(holder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

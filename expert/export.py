"""Export a selected expert as one folder that loads without EXPERT: base model, adapter, model card.

    export_expert(Path("artifacts/select/KEY"), Path("my-expert"))   # `expert export` on the command line
    (or the select artifact's adapter/ folder, or a report made from it: artifacts/report/KEY)

The pipeline keeps the expert as pieces of its artifact store: the base it was trained on
(quantize/KEY; under quantize.method nf4 or none the imported float weights it points at), the
chosen adapter (select/KEY/adapter), the prompt format (the formatted data) and its scores
(evaluate/KEY). The adapter names its base by that folder's absolute path, which a moved store,
another machine or the Hub cannot resolve. The export gathers the pieces into one folder:

    base/          the base model as transformers loads it (a GPTQ base needs gptqmodel installed)
    adapter/       the LoRA adapter; its base_model_name_or_path is the sibling folder "base"
      or, with merge, model/  the adapter folded into the base's weights (expert/export_merge.py)
    README.md      the model card: what was trained on what, its scores, the prompt, how to load and score it
    expert.json    the same facts, for programs
    manifest.json  every file's size and sha256, written last (`expert verify` checks it)

Every byte copied out of the store is checked against the store's manifest on the way, so a
damaged artifact is reported instead of exported.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from expert.artifacts import MANIFEST, content_id, describe_files, package_versions, verify, write_json_durably
from expert.errors import ExpertError
from expert.export_card import model_card

EXPORT_FORMAT = 1
_CHUNK = 8 << 20


def export_expert(select_dir: Path, out: Path, merge: bool = False, dtype: str = "auto") -> dict[str, Any]:
    """Write the expert selected in `select_dir` (artifacts/select/KEY) into `out` (an empty
    folder); return what expert.json holds. `merge`: one merged model in `dtype` (by name, or
    "auto": the base checkpoint's) instead of base + adapter."""
    from expert.modeling import model_kind, resolve_base

    select_dir = _select_dir(Path(select_dir).resolve())
    manifest = _select_manifest(select_dir)
    select_id, store = content_id(_ref(select_dir, manifest)), select_dir.parent.parent
    model_dir = _upstream(store, manifest, "model")
    train_dir = _upstream(store, manifest, "train")
    data_dir = _upstream(store, manifest, "data")
    # Under quantize.method nf4 or none the base artifact records the imported float weights it
    # stands for (nf4 quantizes them as they load): those are what the export carries.
    base_kind, weights = model_kind(model_dir), resolve_base(model_dir)

    if merge:
        from expert.export_merge import merge_adapter, merged_dtype

        _check_whole(weights)  # the merge reads the store in place: check it first
        dtype = merged_dtype(dtype, weights)
        merge_adapter(model_dir, base_kind, select_dir / "adapter", out / "model", dtype)
        adapter_config = json.loads((select_dir / "adapter" / "adapter_config.json").read_text())
    else:
        _copy_checked(weights, out / "base")
        _copy_checked(select_dir, out / "adapter", under="adapter")
        adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
        adapter_config["base_model_name_or_path"] = "base"
        (out / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True)
                                                             + "\n")

    pipeline, imported = _pipeline_config(store, select_id), _imported(store, model_dir)
    info = {
        "format": EXPORT_FORMAT,
        "name": pipeline.get("name"),
        "exported_from": {"select": manifest["key"], "model": model_dir.name, "train": train_dir.name},
        "base": _base_info(model_dir, imported, base_kind, pipeline.get("model", {}).get("source")),
        "adapter": _adapter_info(manifest, adapter_config),
        "merged": {"folder": "model", "dtype": dtype} if merge else None,
        "training": _training_info(train_dir),
        "prompt": _prompt_info(data_dir),
        "results": _results(store, select_id, model_dir, imported if base_kind in ("gptq", "nf4") else None),
        "versions": package_versions(),
    }
    if merge:  # one model folder holds both
        info["base"]["folder"] = info["adapter"]["folder"] = None
    write_json_durably(out / "expert.json", info)
    (out / "README.md").write_text(model_card(info))
    _readable(out)
    files = describe_files(out)
    write_json_durably(out / MANIFEST, {"stage": "export", "key": manifest["key"], "files": files})
    return info


def _select_dir(given: Path) -> Path:
    """The select artifact, given it, its adapter/ folder, or a report made from it (the report's
    summary.json names its adapter, `select/KEY/adapter`)."""
    if given.name == "adapter" and (given.parent / MANIFEST).is_file():
        return given.parent
    summary = given / "summary.json"
    if (given / MANIFEST).is_file() and _read_manifest(given).get("stage") == "report" and summary.is_file():
        adapter = json.loads(summary.read_text()).get("expert", {}).get("adapter")
        if adapter is None:
            raise ExpertError(f"the report {given} names no expert (it was written before reports did, or its run "
                              "had no selection); give the select artifact, artifacts/select/<key>")
        return given.parent.parent / Path(adapter).parent
    return given


def _select_manifest(select_dir: Path) -> dict[str, Any]:
    if not (select_dir / MANIFEST).is_file():
        raise ExpertError(f"'{select_dir}' is not a select artifact (it has no {MANIFEST}); give the folder the "
                          "select stage wrote, artifacts/select/<key> (the report's 'Checkpoint selection' names it)")
    manifest = _read_manifest(select_dir)
    if manifest.get("stage") != "select":
        raise ExpertError(f"'{select_dir}' is a {manifest.get('stage')} artifact, not a select one; give "
                          "artifacts/select/<key>, the folder holding the chosen adapter/, or the report made "
                          "from it, artifacts/report/<key>")
    problem = verify(select_dir, full=True)
    if problem:
        raise ExpertError(f"the select artifact is damaged ({problem}); delete {select_dir} and run the "
                          "pipeline again (it selects again from the kept checkpoints)")
    return manifest


def _read_manifest(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise ExpertError(f"{folder / MANIFEST} is unreadable ({exc}); delete {folder} and run the pipeline "
                          "again") from None


def _ref(folder: Path, manifest: dict[str, Any]) -> dict[str, str]:
    return {"stage": manifest.get("stage", ""), "key": manifest["key"], "path": str(folder)}


def _upstream(store: Path, manifest: dict[str, Any], role: str) -> Path:
    """The artifact the selection was computed from in `role`, with the very content it read."""
    wanted = manifest.get("upstream", {}).get(role)
    if wanted is None:
        raise ExpertError(f"the select artifact {manifest['key']} records no '{role}' input; it was made by "
                          "another version of EXPERT: run the pipeline again to select anew")
    key = wanted.split("@")[0]
    found = [p for p in store.glob(f"*/{key}") if (p / MANIFEST).is_file()]
    if not found:
        raise ExpertError(f"the {role} artifact {key} that the selection {manifest['key']} was made from is not in "
                          f"the store {store} (deleted?); run the pipeline again: it rebuilds it")
    folder = found[0]
    if content_id(_ref(folder, _read_manifest(folder))) != wanted:
        raise ExpertError(f"the {role} artifact {folder} was rebuilt after the selection {manifest['key']} and "
                          "holds other files now; run the pipeline again so that training and selection follow it")
    return folder


def _readable(out: Path) -> None:
    """Files as the user's umask makes new ones: save_pretrained leaves its weights owner-only
    (0600), which a folder made to be shared should not be."""
    umask = _umask()
    for path in out.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _umask() -> int:
    """The process's umask. Linux shows it in /proc; elsewhere Python can only read it by setting
    it for an instant, in which a file another thread creates would get mode 0666."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _check_whole(folder: Path) -> None:
    problem = verify(folder, full=True)
    if problem:
        raise ExpertError(f"the base model artifact is damaged ({problem}); delete {folder} and run the pipeline "
                          "again, it rebuilds it")


def _copy_checked(src: Path, dst: Path, under: str = "") -> None:
    """Copy the artifact `src`'s model files (those under `under`/, if given; not its reports or
    manifest) to `dst`, each checked against the manifest's digest while it is read."""
    from tqdm.auto import tqdm

    manifest = _read_manifest(src)
    prefix = f"{under}/" if under else ""
    files = {rel: desc for rel, desc in manifest["files"].items()
             if rel.startswith(prefix) and not desc.get("report")}
    if not files:
        raise ExpertError(f"{src} lists no files{f' under {under}/' if under else ''} in its manifest; delete it "
                          "and run the pipeline again")
    with tqdm(total=sum(d["size"] for d in files.values()), desc=f"export {dst.name}", unit="B",
              unit_scale=True, dynamic_ncols=True) as bar:
        for rel, desc in sorted(files.items()):
            target = dst / rel[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            try:
                with open(src / rel, "rb") as reader, open(target, "wb") as writer:
                    while chunk := reader.read(_CHUNK):
                        digest.update(chunk)
                        writer.write(chunk)
                        bar.update(len(chunk))
            except FileNotFoundError:
                raise ExpertError(f"{src / rel} is listed in the artifact's manifest but missing; delete {src} "
                                  "and run the pipeline again") from None
            if digest.hexdigest() != desc["sha256"]:
                raise ExpertError(f"{src / rel} differs from its manifest digest (corrupted?); delete {src} and run "
                                  "the pipeline again, it rebuilds it")


def _base_info(model_dir: Path, imported: Path | None, kind: str, source: str | None) -> dict[str, Any]:
    manifest = _read_manifest(model_dir)
    info: dict[str, Any] = {"folder": "base", "kind": kind, "artifact": f"{manifest['stage']}/{manifest['key']}",
                            "source": source}
    if manifest.get("stage") == "quantize":
        config = manifest.get("config", {})
        info["quantization"] = {k: config[k] for k in ("method", "bits", "group_size", "sym", "desc_act")
                                if k in config}
    if imported is not None:
        details = _read_manifest(imported).get("info", {})
        info.update({k: details[k] for k in ("architecture", "n_params") if k in details})
    return info


def _imported(store: Path, model_dir: Path) -> Path | None:
    """The import_model artifact a base came from (itself, or the quantize stage's input)."""
    manifest = _read_manifest(model_dir)
    if manifest.get("stage") == "import_model":
        return model_dir
    key = manifest.get("upstream", {}).get("model", "").split("@")[0]
    folder = store / "import_model" / key
    return folder if key and (folder / MANIFEST).is_file() else None


def _pipeline_config(store: Path, select_id: str) -> dict[str, Any]:
    """The pipeline config of a report made from this selection: the one place that keeps the
    model's source (import keys name its content, not where it came from). {} when none."""
    for path in sorted(store.glob(f"report/*/{MANIFEST}")):
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if manifest.get("upstream", {}).get("select") == select_id:
            return manifest.get("config", {})
    return {}


def _adapter_info(manifest: dict[str, Any], adapter_config: dict[str, Any]) -> dict[str, Any]:
    chosen = manifest.get("info", {})
    lora = {k: adapter_config.get(k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules")}
    if isinstance(lora["target_modules"], list):
        lora["target_modules"] = sorted(lora["target_modules"])
    return {"folder": "adapter", "step": chosen.get("step"), "selected_by": chosen.get("metric"),
            "dev_score": chosen.get("score"), "dev_questions": chosen.get("dev_questions"),
            "checkpoints_scored": chosen.get("checkpoints"), "lora": lora}


def _training_info(train_dir: Path) -> dict[str, Any]:
    path = train_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    return {k: summary.get(k) for k in ("examples", "steps", "epochs", "final_dev_loss", "device", "precision")}


def _prompt_info(data_dir: Path) -> dict[str, Any]:
    """How the expert was asked: the template, the choices, and one dev prompt as it was scored."""
    import pyarrow.parquet as pq

    from expert.benchmarks import registry

    stats = json.loads((data_dir / "stats.json").read_text())
    benchmark = registry.get(stats["benchmark"])
    example = pq.read_table(data_dir / "dev.parquet", columns=["prompt", "answer"]).slice(0, 1).to_pylist()
    template = None
    if benchmark.name == "pubmedqa":
        from expert.benchmarks.pubmedqa import TEMPLATES

        template = TEMPLATES.get(stats.get("template", ""))
    return {"benchmark": benchmark.name, "template_name": stats.get("template"), "template": template,
            "choices": list(benchmark.choices), "continuation": "' ' + choice",
            "example": example[0] if example else None}


def _results(store: Path, expert_id: str, model_dir: Path, original: Path | None) -> list[dict[str, Any]]:
    """The store's evaluations of this expert, of the base it was trained on, and of `original`,
    the model that base was quantized from (the report's rows)."""
    roles = {content_id(_ref(model_dir, _read_manifest(model_dir))): "base"}
    if original is not None:
        roles[content_id(_ref(original, _read_manifest(original)))] = "original"
    rows = []
    for path in sorted(store.glob(f"evaluate/*/{MANIFEST}")):
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a damaged evaluation is not ours to judge here: `expert verify` says so
        upstream, metrics = manifest.get("upstream", {}), manifest.get("info", {})
        model, adapter = roles.get(upstream.get("model")), upstream.get("adapter")
        if model is None or adapter not in (None, expert_id) or (adapter and model != "base"):
            continue
        row = {"model": "expert" if adapter else model, "benchmark": metrics.get("benchmark"),
               "split": metrics.get("split", "test"), "n": metrics.get("n")}
        row.update({k: metrics[k] for k in ("accuracy", "macro_f1", "average") if k in metrics})
        rows.append(row)
    order = {"expert": 0, "base": 1, "original": 2}
    return sorted(rows, key=lambda r: (str(r["benchmark"]), order[r["model"]], -(r["n"] or 0)))

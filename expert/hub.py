"""Talking to the Hugging Face hub: which files to fetch, and retrying what a retry can fix.

Network failures, 5xx and 429 answers are retried with growing pauses; a missing repository,
a gated one (401/403) or offline mode fails at once with a message that says what to do.
"""

from __future__ import annotations

import logging
import time

from expert.errors import ModelError

log = logging.getLogger(__name__)

RETRY_DELAYS = (2.0, 5.0, 15.0, 30.0)  # seconds between hub attempts
# The files that make a model folder, besides its weights.
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)


def is_tokenizer_file(name: str) -> bool:
    return name in TOKENIZER_FILES or name.endswith(".tiktoken")


def hub_files(repo_files: list[str], trust_remote_code: bool, where: str) -> list[str]:
    """Top-level repo files worth downloading: safetensors if any (else .bin), config, tokenizer."""
    top = [f for f in repo_files if "/" not in f]
    st = [f for f in top if f.endswith((".safetensors", ".safetensors.index.json"))]
    weights = st or [f for f in top if f.startswith("pytorch_model") and f.endswith((".bin", ".bin.index.json"))]
    if not weights:
        raise ModelError(
            f"{where} has no safetensors or pytorch_model*.bin weights at its top level. For a "
            "GGUF-only repository, download the .gguf file and use model.source: gguf:FILE."
        )
    extra = [f for f in top if f in CONFIG_FILES or is_tokenizer_file(f) or (trust_remote_code and f.endswith(".py"))]
    return sorted(set(weights + extra))


def check_repo_id(repo_id: str, field: str, error: type[Exception] = ModelError) -> None:
    """Refuse a malformed hub name before anything is fetched or any cache path is made from it.

    huggingface_hub checks names too, but only inside the call, where a retry loop would try a
    name like '../x' again and again as if the network had failed.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise error(
            f"{field} 'hf:{repo_id}' is not a Hugging Face repository name: write hf:ORG/NAME (letters, digits, "
            "'-', '_' and '.', at most 96 characters, no '--' or '..'), e.g. hf:cais/mmlu"
        ) from None


def with_retries(call, where: str, delays: tuple[float, ...] | None = None, error: type[Exception] = ModelError,
                 instead: str = "download the model and give its folder as model.source"):
    """Run `call`, retrying network failures with growing pauses; other hub errors are final.

    Failures raise `error`; `instead` says what to do when the hub cannot be reached.
    """
    delays = RETRY_DELAYS if delays is None else delays
    for attempt in range(len(delays) + 1):
        try:
            return call()
        except Exception as exc:
            if not _is_transient(exc):
                raise error(f"cannot fetch {where}: {type(exc).__name__}: {exc}") from exc
            if attempt == len(delays):
                raise error(
                    f"cannot fetch {where}: the hub did not answer after {attempt + 1} tries "
                    f"({type(exc).__name__}: {exc}). Check the network (or HF_ENDPOINT) and run again, "
                    f"or {instead}."
                ) from exc
            # said, so that a stalled fetch is not minutes of silence in the logs
            log.warning("cannot fetch %s (%s: %s); trying again in %g s (attempt %d of %d)", where,
                        type(exc).__name__, exc, delays[attempt], attempt + 2, len(delays) + 1)
            time.sleep(delays[attempt])


def _is_transient(exc: Exception) -> bool:
    import httpx  # huggingface_hub's HTTP client
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, HfHubHTTPError):  # 404 (no such repo), 401/403 (gated) are final
        status = getattr(exc.response, "status_code", None)
        return status is None or status == 429 or status >= 500
    if isinstance(exc, OfflineModeIsEnabled):  # a ConnectionError that retrying cannot fix
        return False
    return isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError))

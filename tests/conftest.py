"""Test-wide settings: Prefect state in a throwaway folder, no telemetry, no network."""

import atexit
import os
import shutil
import tempfile

# Set before anything imports prefect: its settings are read at import time.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="expert-tests-prefect-")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A model's own code (the trust_remote_code tests) is copied here by transformers, read at import.
os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="expert-tests-hf-modules-")
# Registered before prefect is imported, so it runs after Prefect's own exit handlers (LIFO),
# once the test server has stopped writing its database: a test run leaves nothing in /tmp.
for _folder in (os.environ["PREFECT_HOME"], os.environ["HF_MODULES_CACHE"]):
    atexit.register(shutil.rmtree, _folder, ignore_errors=True)

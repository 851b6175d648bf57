"""The pipeline's stages as plain objects: what each fetches, what decides its key, what it writes.

A stage never runs itself: `tasks/stage.py` (Prefect) or a script asks it for its
`StageRequest` and hands `produce` to the artifact store, which publishes the folder
atomically. Bump a stage's `version` whenever its logic or output format changes, so old
artifacts stop matching.
"""

from expert.stages.base import Stage
from expert.stages.evaluation import Evaluate, Report
from expert.stages.inputs import FormatMMLU, FormatPubMedQA, ImportModel
from expert.stages.tuning import Quantize, Select, Train

__all__ = ["Stage", "ImportModel", "FormatPubMedQA", "FormatMMLU", "Quantize", "Train", "Select",
           "Evaluate", "Report"]

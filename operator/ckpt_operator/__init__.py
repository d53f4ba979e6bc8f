"""ckpt_operator: the TrainingJob operator (kopf). Run it with the `ckpt-operator` console script."""

from .errors import InvalidSpecError, OperatorError
from .models import Phase, TrainingJobSpec, TrainingJobStatus

__version__ = "0.1.0"

__all__ = ["InvalidSpecError", "OperatorError", "Phase", "TrainingJobSpec", "TrainingJobStatus", "__version__"]

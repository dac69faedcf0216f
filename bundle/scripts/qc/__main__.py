"""`python -m scripts.qc reference|folds|evaluate|robustness`: QC calibration and the robustness benchmark."""

import fire
from scripts.qc.calibration import evaluate, folds, reference
from scripts.qc.robustness import robustness

fire.Fire({"reference": reference, "folds": folds, "evaluate": evaluate, "robustness": robustness})

"""`python -m scripts.qc reference|folds|evaluate|robustness`: QC calibration and the robustness benchmark."""

import fire
from scripts.qc.calibration import evaluate, reference
from scripts.qc.folds import folds
from scripts.qc.robustness import robustness

fire.Fire({"reference": reference, "folds": folds, "evaluate": evaluate, "robustness": robustness})

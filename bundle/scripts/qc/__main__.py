"""`python -m scripts.qc reference|evaluate|robustness`: QC calibration and the robustness benchmark."""

import fire
from scripts.qc.calibration import evaluate, reference
from scripts.qc.robustness import robustness

fire.Fire({"reference": reference, "evaluate": evaluate, "robustness": robustness})

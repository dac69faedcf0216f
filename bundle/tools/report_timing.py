"""What the cohort report adds to a run: QC pictures and `report.html` for many synthetic crops. Run from the bundle
folder:

    python -m tools.report_timing --cases 1000 --output_dir OUT
"""

from __future__ import annotations

import os
import time

from scripts import BUNDLE_DIR
from scripts.data.synthetic import make_synthetic_dataset
from scripts.inference.report import write_report
from scripts.qc.pictures import draw_qc_png
from scripts.recipe import load


def time_report(cases: int = 1000, output_dir: str = "eval/report_time") -> dict:
    """What the report adds to a run of `cases` synthetic crops (their labels stand in for masks): drawing their QC
    pictures (`scripts.qc.pictures.draw_qc_png`) and writing `report.html`; prints and returns seconds and the page's size.
    """
    task = make_synthetic_dataset(os.path.join(output_dir, "task"), num_cases=cases)
    quality = load(BUNDLE_DIR, ["configs/inference.yaml"], {}).get_parsed_content("qc")
    images = sorted(os.listdir(os.path.join(task, "imagesTr")))
    rows = [quality.row(name, os.path.join(task, "labelsTr", name), confidence=0.96) for name in images]
    pictures = {name: os.path.join(output_dir, "qc", name.replace(".nii.gz", ".png")) for name in images}
    start = time.perf_counter()
    for name in images:
        draw_qc_png(os.path.join(task, "imagesTr", name), os.path.join(task, "labelsTr", name), pictures[name])
    pictures_s = time.perf_counter() - start
    start = time.perf_counter()
    write_report(os.path.join(output_dir, "report.html"), rows, [], pictures, f"{cases} synthetic crops")
    result = {
        "cases": cases,
        "pictures_s": round(pictures_s, 1),
        "page_s": round(time.perf_counter() - start, 1),
        "page_mb": round(os.path.getsize(os.path.join(output_dir, "report.html")) / 2**20, 1),
    }
    print(result)
    return result


if __name__ == "__main__":
    import fire

    fire.Fire(time_report, serialize=lambda result: None)

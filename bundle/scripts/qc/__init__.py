"""Quality control: each case's volumes and flags, its QC picture, and their calibration on labelled data."""

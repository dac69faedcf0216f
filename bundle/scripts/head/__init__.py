"""Whole heads: brain extraction and registration to the MNI152 brain place one box per hippocampus, which the crop model segments."""

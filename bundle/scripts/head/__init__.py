"""Whole heads: brain extraction and registration place one box per hippocampus for the crop model."""

"""MSD task data: reading, splitting and checking a task, its download, input checks, augmentations, a synthetic task."""

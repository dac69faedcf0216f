"""MSD task data: reading and splitting a task, checking its cases, downloading it, input checks and augmentations, and a synthetic task."""

"""What MONAI's engines lack here: handlers, CPU mixed precision, flip averaging, processes, the benchmark."""

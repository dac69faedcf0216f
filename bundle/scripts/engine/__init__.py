"""What MONAI's engines lack here: Ignite handlers, CPU mixed precision, flip-averaging inference, the multi-process set-up and the throughput benchmark."""

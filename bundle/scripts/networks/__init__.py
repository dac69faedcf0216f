"""The segmentation network (the TensorFlow recipe's V-Net) and its deep-supervision loss."""

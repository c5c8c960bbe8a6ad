"""The model: backbone loading, architecture knowledge (blocks, pooling, suffix forward) and the classifier."""

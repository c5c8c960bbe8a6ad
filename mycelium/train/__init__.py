"""Training: preparation, batch sources, the loop, attempts and the fallback ladder (``train.run.run``)."""

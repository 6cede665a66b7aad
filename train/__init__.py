"""MMAP training (installed as `mmap_train`): the model, datasets, phase 1 and 2, evaluation."""

"""Demo data shipped with the package: a small her2st sample and a demo bundle."""

"""What goes in: slides and their pyramid levels, spot tables and Space Ranger / HD folders,
geometry checks, tissue detection and the spot grid for slides with no assay."""

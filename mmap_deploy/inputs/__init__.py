"""What goes in: slides and their pyramid levels, spot tables and Space Ranger / HD folders, geometry checks, tissue and spot grids."""

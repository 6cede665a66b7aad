"""What comes out: the AnnData (.h5ad) and SpatialData (.zarr) outputs, gene maps, the overview
picture, and the prediction record they are made from."""

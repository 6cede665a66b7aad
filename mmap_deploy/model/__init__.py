"""The model as the runtime sees it: the bundle and its manifest, preprocessing (patch geometry,
views), prototypes (k-means, top-L)."""

"""Slide reader backends behind one interface (`base.SlideReader`).

- `openslide_reader`: vendor formats (SVS, NDPI, MRXS, SCN, ...), generic
  pyramidal TIFF and DICOM WSI, through OpenSlide;
- `tifffile_reader`: OME-TIFF (pyramids in SubIFDs or as separate series) and
  other TIFF pyramids OpenSlide misreads or refuses (big-endian), through
  tifffile and imagecodecs (the `[tiff]` extra); reads local paths and binary
  file objects with range reads (fsspec files);
- `image_reader`: plain JPEG/PNG/TIFF images, decoded once into memory;
- `dicom_folder`: a DICOM WSI series given as its folder.

`mmap_deploy.inputs.slide.open_slide` picks one per file and records why.
"""

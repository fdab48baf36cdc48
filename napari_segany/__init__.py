"""napari front-end of segany (the dock widget arrives with the napari issue)."""

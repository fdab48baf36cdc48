"""QGIS front-end of segany (the Processing provider arrives with the QGIS issue)."""

"""Faces: detect.py (SCRFD detector, zoomed second look), track.py (tracks, One Euro smoothing),
align.py (crop transforms, warp, paste back), colour.py (colour and tone matching), methods.py
(blur, pixelate, solid)."""

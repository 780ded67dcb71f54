"""imgserver: a local image-processing service (resize, split, blur) on OpenCV."""

__version__ = "0.1.0"

"""The image code: what happens to pixels, from an input file to its output files.

    paths       confinement to the root: the security boundary, checked before a file opens
    probe       an image's format and size from its header; its EXIF orientation
    codec       strict decoding, explicit conversions, atomic encoding
    operations  the operation grammar and what each operation does
    blur        the Gaussian blur whose cost does not grow with the kernel
    kernels     Gaussian kernels folded onto the reflected border; exact blurs at full size
    pipeline    one image from input file to outputs: the function the workers run
    thumbnail   the thumbnails the workers make of a job's files

It runs in worker processes and knows nothing of jobs, HTTP, asyncio or watchdog: it may
import only ``imgserver.errors`` and the standard library, numpy and OpenCV.
"""

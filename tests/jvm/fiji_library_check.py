# Run by Debian's Jython with ImageJ1 and JHDF5 on the class path (tests/test_fiji_bridge.py):
# exercises fiji_macros' dinofeat_fiji library as Fiji would, and prints what it saw as JSON.
#   jython fiji_library_check.py LIBRARY_DIR FEATURES.h5 FEATURES.tif LABELS.tif DINOFEAT SERVER IMAGE.tif OUT.h5
import json
import sys

sys.path.insert(0, sys.argv[1])
from ij import IJ  # noqa: E402

import dinofeat_fiji  # noqa: E402


def describe(stack):
    """Labels, size and per-slice sums (doubles) of an ImageStack."""
    sums = []
    for n in range(1, stack.getSize() + 1):
        pixels = stack.getProcessor(n).getPixels()
        sums.append(sum(float(v) for v in pixels))
    return {"labels": [stack.getSliceLabel(n) for n in range(1, stack.getSize() + 1)], "width": stack.getWidth(),
            "height": stack.getHeight(), "sums": sums, "first_pixels": [float(v) for v in stack.getProcessor(1).getPixels()[:5]]}


h5, tiff, labels, dinofeat, server, image, fetched = sys.argv[2:9]
report = {"h5": describe(dinofeat_fiji.read_h5_stack(h5)), "tiff": describe(dinofeat_fiji.open_tiff_stack(tiff))}
rois = dinofeat_fiji.label_rois(IJ.openImage(labels))
report["rois"] = dict((str(value), [[n, len(roi.getContainedPoints())] for n, roi in entries]) for value, entries in rois.items())
report["class_order"] = sorted(["10", "cells", "2"], key=dinofeat_fiji.class_order)
seen_progress = []
dinofeat_fiji.fetch_features(dinofeat, server, image, fetched, "classical", progress=lambda *p: seen_progress.append(list(p)))
report["progress"] = seen_progress
report["fetched"] = describe(dinofeat_fiji.feature_stack(fetched))
try:
    dinofeat_fiji.fetch_features(dinofeat, server, image + ".missing", fetched + ".never.h5", "classical")
except RuntimeError as error:
    report["fetch_error"] = str(error)
print("REPORT " + json.dumps(report))

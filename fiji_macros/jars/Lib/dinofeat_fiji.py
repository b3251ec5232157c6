# dinofeat for Fiji (Jython 2.7): feature stacks as labelled ImageJ stacks and Trainable Weka
# Segmentation trained and applied on them through TWS's array-based API.
#
# Install: copy this file to Fiji.app/jars/Lib/ (Fiji's Jython finds modules there) and
# scripts/Plugins/dinofeat/ to Fiji.app/scripts/Plugins/dinofeat/. See fiji_macros/README.md.
# Everything but the TWS functions runs on plain ImageJ1 (+ JHDF5 for .h5 files), which is how it is tested.
import json
import os
import re

from java.lang import ProcessBuilder
from java.io import BufferedReader, InputStreamReader
from ij import IJ, ImagePlus, ImageStack
from ij.process import FloatProcessor, ImageProcessor
from ij.plugin.filter import ThresholdToSelection


def read_h5_stack(path, z=None):
    """A labelled ImageStack of a dinofeat feature file (.h5), read channel by channel with JHDF5.

    z picks the slice of a (C, Z, Y, X) file. Channel names come from the channel_names_json attribute."""
    from ch.systemsx.cisd.hdf5 import HDF5Factory
    reader = HDF5Factory.openForReading(path)
    try:
        dims = list(reader.object().getDataSetInformation("features").getDimensions())
        names = json.loads(reader.string().getAttr("features", "channel_names_json"))
        height, width = int(dims[-2]), int(dims[-1])
        stack = ImageStack(width, height)
        for c in range(int(dims[0])):
            if len(dims) == 4:
                block, offset = [1, 1, height, width], [c, z or 0, 0, 0]
            else:
                block, offset = [1, height, width], [c, 0, 0]
            plane = reader.float32().readMDArrayBlockWithOffset("features", block, offset)
            stack.addSlice(names[c], FloatProcessor(width, height, plane.getAsFlatArray()))
        return stack
    finally:
        reader.close()


def open_tiff_stack(path):
    """The labelled ImageStack of a feature hyperstack TIFF (`dinofeat features -o F.tif`)."""
    image = IJ.openImage(path)
    if image is None:
        raise ValueError("ImageJ cannot open %s as an image" % path)
    return image.getStack()


def feature_stack(path, z=None):
    """A labelled feature ImageStack from a .h5 or .tif feature file."""
    if path.lower().endswith((".h5", ".hdf5")):
        return read_h5_stack(path, z)
    return open_tiff_stack(path)


DEEP_SETS = ("dinov2", "attention", "hybrid")
"""The sets that take --preset (dinofeat refuses it with a filter bank); the command line's computation.DEEP_SETS."""


def deep_options(feature_set, preset, backbone, weights=None):
    """The `dinofeat features` options of the chosen set: a deep set's preset, backbone and weights file (None:
    the server's own); none for a filter bank, which dinofeat refuses them with."""
    if feature_set not in DEEP_SETS:
        return []
    return ["--preset", preset, "--backbone", backbone] + (["--weights", weights] if weights else [])


PROGRESS_LINE = re.compile(r"^dinofeat: (.+?) (\d+)/(\d+)[ ,]")
"""dinofeat's progress lines outside a terminal: "dinofeat: STAGE DONE/TOTAL (P %), RATE/s, about T left"."""


def progress_of_line(line):
    """(stage, done, total) of one of dinofeat's progress lines, or None for any other line."""
    match = PROGRESS_LINE.match(line)
    if match is None:
        return None
    return match.group(1), int(match.group(2)), int(match.group(3))


def show_progress(stage, done, total):
    """Fiji's progress bar and status line."""
    IJ.showProgress(done, total)
    IJ.showStatus("dinofeat: %s %d/%d" % (stage, done, total))


def fetch_features(dinofeat, server, image_path, output, feature_set="hybrid", options=(), progress=show_progress):
    """Run the dinofeat command line to compute features of image_path on server into output (.tif or .h5),
    passing its progress (stages, tiles, views) to `progress` (Fiji's progress bar by default) and its
    notices (e.g. the expected time of a long computation) to Fiji's log.

    Raises RuntimeError with dinofeat's own one-sentence message when it fails."""
    command = [dinofeat, "features", image_path, "-o", output, "--set", feature_set]
    if server:
        command += ["--server", server]
    command += list(options)
    builder = ProcessBuilder(command)
    builder.redirectErrorStream(True)
    if builder.environment().get("DINOFEAT_PROGRESS_SECONDS") is None:
        builder.environment().put("DINOFEAT_PROGRESS_SECONDS", "1")
    process = builder.start()
    reader = BufferedReader(InputStreamReader(process.getInputStream()))
    lines, last = [], None
    line = reader.readLine()
    while line is not None:
        seen = progress_of_line(line)
        if seen is not None:
            progress(*seen)
            last = seen
        else:
            lines.append(line)
            if not line.startswith(("wrote ", "dinofeat: error: ")):
                IJ.log(line)
        line = reader.readLine()
    if process.waitFor() != 0:
        raise RuntimeError(lines[-1] if lines else "dinofeat failed without a message")
    if last is not None and last[1] < last[2]:  # progress lines come at most once a second: the last may fall short
        progress(last[0], last[2], last[2])
    return output


def value_roi(processor, value):
    """A Roi covering the pixels of an integer label processor equal to value (thresholded, no pixel loops)."""
    processor = processor.duplicate()
    processor.setThreshold(value, value, ImageProcessor.NO_LUT_UPDATE)
    return ThresholdToSelection.run(ImagePlus("labels", processor))


def label_rois(labels):
    """{class value: [(slice number, Roi), ...]} of a label ImagePlus (8- or 16-bit; 0 = unlabelled)."""
    rois = {}
    stack = labels.getStack()
    for n in range(1, stack.getSize() + 1):
        processor = stack.getProcessor(n)
        if isinstance(processor, FloatProcessor):
            processor = processor.convertToShortProcessor(False)
        for value, count in enumerate(processor.getHistogram()):
            if value and count:
                rois.setdefault(value, []).append((n, value_roi(processor, value)))
    return rois


def manager_rois(manager):
    """{class name: [(slice number, Roi), ...]} of the ROI Manager entries, each named by its class
    (a name's text before the first "-" or " " is the class: "cells-1" and "cells 2" are both "cells")."""
    rois = {}
    for roi in manager.getRoisAsArray():
        name = roi.getName() or "class"
        for separator in ("-", " "):
            name = name.split(separator)[0]
        rois.setdefault(name, []).append((max(roi.getPosition(), 1), roi))
    return rois


def feature_stack_array(stacks, width, height):
    """A TWS FeatureStackArray with one FeatureStack per labelled ImageStack (one per image slice)."""
    from trainableSegmentation import FeatureStack, FeatureStackArray
    array = FeatureStackArray(len(stacks))
    for z, stack in enumerate(stacks):
        features = FeatureStack(width, height, False)
        features.setStack(stack)
        array.set(features, z)
    return array


def class_order(name):
    """Classes in the order of their label values when they are numbers (2 before 10), else by name."""
    try:
        return (0, float(name), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(name))


def train_tws(image, stacks, class_rois):
    """A WekaSegmentation trained on the features in stacks, with examples {class name: [(slice, Roi)]}."""
    from trainableSegmentation import WekaSegmentation
    array = feature_stack_array(stacks, image.getWidth(), image.getHeight())
    segmentation = WekaSegmentation(image)
    segmentation.setFeatureStackArray(array)
    names = sorted(class_rois, key=class_order)
    while segmentation.getNumOfClasses() < len(names):
        segmentation.addClass()
    for index, name in enumerate(names):
        segmentation.setClassLabel(index, str(name))
        for n, roi in class_rois[name]:
            segmentation.addExample(index, roi, n)
    if not segmentation.trainClassifier():
        raise RuntimeError("Trainable Weka Segmentation could not train; draw examples of at least two classes")
    return segmentation


def apply_tws(segmentation, image, stacks, probabilities=True):
    """Probability maps (or a class map) of image from its feature stacks; only the array-based call keeps our features."""
    array = feature_stack_array(stacks, image.getWidth(), image.getHeight())
    segmentation.setFeatureStackArray(array)  # again: loading a classifier marks the features dirty
    return segmentation.applyClassifier(image, array, 0, probabilities)


def load_tws(image, classifier_path):
    """A WekaSegmentation with a saved classifier, ready for apply_tws."""
    from trainableSegmentation import WekaSegmentation
    segmentation = WekaSegmentation(image)
    if not segmentation.loadClassifier(classifier_path):
        raise RuntimeError("%s is not a classifier Trainable Weka Segmentation can load" % classifier_path)
    return segmentation


def image_stacks(image, feature_path=None, dinofeat="dinofeat", server="", feature_set="hybrid", options=()):
    """One labelled feature ImageStack per slice of image: read from feature_path, or computed by dinofeat."""
    if not feature_path:
        folder = IJ.getDirectory("temp")
        source = os.path.join(folder, "dinofeat_input_%d.tif" % image.getID())
        IJ.saveAsTiff(image.duplicate(), source)
        feature_path = fetch_features(dinofeat, server, source, os.path.join(folder, "dinofeat_features_%d.h5" % image.getID()),
                                      feature_set, options)
    if image.getNSlices() > 1:
        return [read_h5_stack(feature_path, z) for z in range(image.getNSlices())]
    return [feature_stack(feature_path)]

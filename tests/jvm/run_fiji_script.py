# Run by Debian's Jython on a Fiji.app's class path (tests/test_fiji_script_real.py): runs a shipped Fiji
# script unchanged, as Fiji would, with its `#@` script parameters set to given values.
#   jython run_fiji_script.py SCRIPT.py LIBRARY_DIR SETTINGS.json REPORT.json
# SETTINGS.json: {"values": {parameter name: value}, "seed": int or null, "result": path of the TIFF to write}.
#
# SciJava (absent from the vendored Fiji) normally fills the `#@ Type name` parameters; here each `#@` line of
# the script is parsed and its name defined from SETTINGS (ImagePlus: an image file opened by ImageJ; File: a
# java.io.File; String: one of its choices when it has some; Boolean and numbers as such). A parameter without
# a value takes its `value=`, its first choice, or null when not required, as SciJava would; anything else stops
# the run. ImageJ runs in batch mode, as headless Fiji does, so the image the script shows is kept, not
# displayed; it is saved to "result". With "seed", every WekaSegmentation the script makes has its forest
# seeded (TWS draws a seed otherwise). TWS's worker threads are stopped and the JVM halted at the end, so the
# run cannot hang on them. The report: the parameters, the result image and what TWS trained on.
import json
import re
import sys
import traceback

from java.io import File
from java.lang import Runtime
from ij import IJ, WindowManager
from ij.macro import Interpreter

script, library, settings_path, report_path = sys.argv[1:5]
with open(settings_path) as handle:
    settings = json.load(handle)

PARAMETER = re.compile(r"^#@\s*([\w.]+)\s*(?:\((.*)\))?\s*(\w+)\s*$")
ATTRIBUTE = re.compile(r'(\w+)\s*=\s*("(?:[^"\\]|\\.)*"|\{[^}]*\}|[^,\s]+)')
INTEGERS = ("int", "Integer", "long", "Long", "short", "Short", "byte", "Byte")
DECIMALS = ("float", "Float", "double", "Double")


def attributes(text):
    """{name: value} of a parameter's (key=value, ...) text; quoted strings unquoted, {"a", "b"} as lists."""
    found = {}
    for key, value in ATTRIBUTE.findall(text or ""):
        if value.startswith('"'):
            value = value[1:-1]
        elif value.startswith("{"):
            value = [item.strip().strip('"') for item in value[1:-1].split(",") if item.strip()]
        found[key] = value
    return found


def parameters(path):
    """[(type, name, attributes)] of the script's `#@` lines, in order."""
    found = []
    with open(path) as handle:
        for line in handle:
            if not line.startswith("#@"):
                continue
            match = PARAMETER.match(line.strip())
            if match is None:
                raise ValueError("cannot read the script parameter line %r" % line.strip())
            found.append((match.group(1), match.group(3), attributes(match.group(2))))
    return found


def converted(kind, name, value, attrs):
    """The object SciJava would inject for a parameter of type kind given value (a JSON value)."""
    if value is None:
        return None
    if kind == "ImagePlus":
        image = IJ.openImage(value)
        if image is None:
            raise ValueError("ImageJ cannot open %s for the parameter %s" % (value, name))
        return image
    if kind == "File":
        return File(value)
    if kind == "String":
        if "choices" in attrs and value not in attrs["choices"]:
            raise ValueError("%r is not one of the choices of %s: %s" % (value, name, ", ".join(attrs["choices"])))
        return value
    if kind in ("Boolean", "boolean"):
        return value is True or value == "true"
    if kind in INTEGERS:
        return int(value)
    if kind in DECIMALS:
        return float(value)
    raise ValueError("the runner cannot make a %s for the parameter %s" % (kind, name))


def default(kind, name, attrs):
    """The value SciJava gives a parameter the settings leave out."""
    if "value" in attrs:
        return attrs["value"] if kind == "String" else json.loads(attrs["value"])
    if attrs.get("choices"):
        return attrs["choices"][0]
    if attrs.get("required") == "false":
        return None
    raise ValueError("the settings give no value for the required parameter %s (%s)" % (name, kind))


made = []


def seeded_segmentations(seed):
    """Every trainableSegmentation.WekaSegmentation made from now on is recorded and, with a seed, seeded."""
    from trainableSegmentation import WekaSegmentation
    package = sys.modules["trainableSegmentation"]  # a Java package; Debian's Jython (no package cache) has it only now

    class RecordedWekaSegmentation(WekaSegmentation):
        def __init__(self, *args):
            WekaSegmentation.__init__(self, *args)
            if seed is not None:
                self.getClassifier().setSeed(seed)
            made.append(self)

    package.__dict__["WekaSegmentation"] = RecordedWekaSegmentation  # what `from trainableSegmentation import` finds


def described(image):
    stack = image.getStack()
    return {"title": image.getTitle(), "width": image.getWidth(), "height": image.getHeight(), "bit_depth": image.getBitDepth(),
            "slices": stack.getSize(), "slice_labels": [stack.getSliceLabel(n) for n in range(1, stack.getSize() + 1)]}


def trained_on(segmentation):
    features = segmentation.getFeatureStackArray()
    first = features.get(0) if features is not None and features.getSize() else None
    return {"class_labels": [str(label) for label in segmentation.getClassLabels()][:segmentation.getNumOfClasses()],
            "seed": segmentation.getClassifier().getSeed(),
            "features": first.getSize() if first is not None else None,
            "feature_labels": [first.getSliceLabel(n) for n in range(1, first.getSize() + 1)] if first is not None else []}


def run():
    report = {"parameters": []}
    values = dict(settings["values"])
    namespace = {"__name__": "__main__", "__file__": script}
    for kind, name, attrs in parameters(script):
        value = values.pop(name) if name in values else default(kind, name, attrs)
        namespace[name] = converted(kind, name, value, attrs)
        report["parameters"].append({"type": kind, "name": name, "value": value})
    if values:
        raise ValueError("the script has no parameters named %s" % ", ".join(sorted(values)))
    sys.path.insert(0, library)  # as Fiji.app/jars/Lib, where Fiji's Jython finds the library
    Interpreter.batchMode = True  # headless Fiji: shown images are kept in batch mode, not displayed
    seeded_segmentations(settings.get("seed"))
    execfile(script, namespace)  # noqa: F821 (a Jython 2.7 builtin)
    result = Interpreter.getLastBatchModeImage() or WindowManager.getCurrentImage()
    report["segmentations"] = [trained_on(s) for s in made]
    if result is None:
        report["result"] = None
    else:
        report["result"] = described(result)
        if not IJ.saveAsTiff(result, settings["result"]):
            raise IOError("ImageJ could not save the result to %s" % settings["result"])
    return report


status = 1
try:
    with open(report_path, "w") as handle:
        json.dump(run(), handle)
    status = 0
except:  # noqa: E722 (Python and Java exceptions alike end the run with a trace and status 1)
    traceback.print_exc()
finally:
    for segmentation in made:
        segmentation.shutDownNow()  # TWS's worker threads would keep the JVM alive
    sys.stdout.flush()
    sys.stderr.flush()
    Runtime.getRuntime().halt(status)

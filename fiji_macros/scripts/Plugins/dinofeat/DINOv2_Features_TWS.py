#@ ImagePlus image
#@ String (label="dinofeat command (full path if not on PATH)", value="dinofeat", persist=true) dinofeat
#@ String (label="Server host:port (empty: compute on this computer)", value="", persist=true) server
#@ String (label="Feature set", choices={"hybrid", "dinov2", "multiscale", "classical", "ilastik", "attention"}, persist=true) feature_set
#@ String (label="Preset of the deep sets (fast: seconds on a CPU; default: minutes on a CPU, seconds on a GPU)", choices={"default", "fast", "paper", "paper_flips"}, persist=true) preset
#@ String (label="Backbone of the deep sets (DINOv3: give its weights file, or a server that has it)", choices={"dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14", "dinov2_vits14_reg", "dinov2_vitb14_reg", "dinov2_vitl14_reg", "dinov2_vitg14_reg", "dinov3_vits16", "dinov3_vits16plus", "dinov3_vitb16", "dinov3_vitl16", "dinov3_vith16plus", "dinov3_vit7b16"}, persist=true) backbone
#@ File (label="Weights file of the backbone (computing on this computer; DINOv3: the file you downloaded from Meta)", required=false, style="open") weights
#@ File (label="Existing feature file (.h5/.tif; empty: compute it)", required=false, style="open") feature_file
#@ String (label="Examples from", choices={"ROI Manager (names = classes)", "Label image"}, persist=true) examples
#@ ImagePlus (label="Label image (when chosen above)", required=false) label_image
#@ File (label="Load classifier (.model; empty: train a new one)", required=false, style="open") load_classifier
#@ File (label="Save classifier to (.model; optional)", required=false, style="save") save_classifier
#@ Boolean (label="Probability maps (else a class map)", value=true, persist=true) probabilities
# Train Trainable Weka Segmentation on dinofeat's DINOv2 / DINOv3 / hybrid features of the current image, or apply a
# saved classifier, and show the result. Install: see fiji_macros/README.md in the dinofeat sources.
from ij import IJ
from ij.plugin.frame import RoiManager

from dinofeat_fiji import apply_tws, deep_options, image_stacks, label_rois, load_tws, manager_rois, train_tws


def run():
    IJ.showStatus("dinofeat: getting the features of " + image.getTitle())
    options = deep_options(feature_set, preset, backbone, weights.getPath() if weights else None)
    stacks = image_stacks(image, feature_file.getPath() if feature_file else None, dinofeat, server, feature_set, options)
    if load_classifier:
        segmentation = load_tws(image, load_classifier.getPath())
    else:
        if examples.startswith("Label"):
            if label_image is None:
                raise RuntimeError("choose a label image, or take the examples from the ROI Manager")
            rois = label_rois(label_image)
        else:
            manager = RoiManager.getInstance()
            if manager is None or manager.getCount() == 0:
                raise RuntimeError("add class examples to the ROI Manager, named by class (e.g. 'cells', 'background')")
            rois = manager_rois(manager)
        IJ.showStatus("dinofeat: training on %d classes" % len(rois))
        segmentation = train_tws(image, stacks, rois)
    if save_classifier:
        segmentation.saveClassifier(save_classifier.getPath())
    result = apply_tws(segmentation, image, stacks, probabilities)
    result.setTitle(("probabilities of " if probabilities else "classes of ") + image.getTitle())
    result.show()


try:
    run()
except RuntimeError as error:
    IJ.error("dinofeat", str(error))

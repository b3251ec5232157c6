// dinofeat + Trainable Weka Segmentation from the ImageJ macro language.
// Set the server once (Fiji remembers it): call("ij.Prefs.set", "dinofeat.server", "gpu.lab:50051");
// Then: draw examples in the ROI Manager, named by class ("cells", "background", ...), and run this macro
// on the image. It calls the "DINOv2 Features TWS" script (Plugins > dinofeat), which does the work.
server = call("ij.Prefs.get", "dinofeat.server", "");
command = call("ij.Prefs.get", "dinofeat.command", "dinofeat");
featureSet = call("ij.Prefs.get", "dinofeat.set", "hybrid");
preset = call("ij.Prefs.get", "dinofeat.preset", "default");  // "fast" on a CPU: seconds instead of minutes
backbone = call("ij.Prefs.get", "dinofeat.backbone", "dinov2_vits14");  // e.g. "dinov3_vits16", with its weights:
weights = call("ij.Prefs.get", "dinofeat.weights", "");  // the DINOv3 file from Meta, when computing on this computer
if (weights != "") weights = " weights=[" + weights + "]";
run("DINOv2 Features TWS", "image=[" + getTitle() + "] dinofeat=[" + command + "] server=[" + server + "] feature_set=" + featureSet
    + " preset=" + preset + " backbone=" + backbone + weights
    + " examples=[ROI Manager (names = classes)] probabilities=true");

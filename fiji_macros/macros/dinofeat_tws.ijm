// dinofeat + Trainable Weka Segmentation from the ImageJ macro language.
// Set the server once (Fiji remembers it): call("ij.Prefs.set", "dinofeat.server", "gpu.lab:50051");
// Then: draw examples in the ROI Manager, named by class ("cells", "background", ...), and run this macro
// on the image. It calls the "DINOv2 Features TWS" script (Plugins > dinofeat), which does the work.
server = call("ij.Prefs.get", "dinofeat.server", "");
command = call("ij.Prefs.get", "dinofeat.command", "dinofeat");
featureSet = call("ij.Prefs.get", "dinofeat.set", "hybrid");
preset = call("ij.Prefs.get", "dinofeat.preset", "default");  // "fast" on a CPU: seconds instead of minutes
run("DINOv2 Features TWS", "image=[" + getTitle() + "] dinofeat=[" + command + "] server=[" + server + "] feature_set=" + featureSet
    + " preset=" + preset
    + " examples=[ROI Manager (names = classes)] probabilities=true");

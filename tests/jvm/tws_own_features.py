"""Trainable Weka Segmentation with its own default features, for comparison with ours inside it.
   python tws_own_features.py FIJI_DIR IMAGE.tif LABELS.tif SEED CLASSES.tif
Trains TWS's default forest on the labelled pixels with TWS's default features and writes its class map."""
import os
import sys
import tempfile
from pathlib import Path

import tifffile
from dinofeat_client.fiji import tws
from dinofeat_client.fiji.jvm import start_fiji

fiji_dir, image_path, labels_path, seed, output = sys.argv[1:6]
start_fiji(fiji_dir)
image, labels = tifffile.imread(image_path), tifffile.imread(labels_path)
with tempfile.TemporaryDirectory() as folder:
    model = Path(folder) / "own.model"
    tws.train(image.astype("float32"), labels, None, model, int(seed))
    probabilities, values = tws.apply(model, image.astype("float32"), None)
tifffile.imwrite(output, tws.class_map(probabilities, values).astype("uint8"))
os._exit(0)  # as `dinofeat fiji` does: TWS's idle threads would hold up or abort a normal exit

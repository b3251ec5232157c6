"""Fiji / Trainable Weka Segmentation bridge: feature stacks into a JVM as labelled ImageJ stacks,
TWS trained and applied on them through its array-based API (pyimagej, JPype)."""

"""The CNI emulator: per-node overlay tunnel endpoints, egress SNAT, the "internet"."""

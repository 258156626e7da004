"""Workload identity: the cluster CA and the certificates it gives each pod's sidecar."""

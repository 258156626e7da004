"""Cluster DNS for the ``cluster.local`` zone (see ``python -m mesh.dns --help``)."""

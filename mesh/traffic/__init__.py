"""Load generation: the open-model generator behind ``hopscope traffic``."""

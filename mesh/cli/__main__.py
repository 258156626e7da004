"""``python -m mesh.cli`` is the same as the ``hopscope`` command."""

from mesh.cli import main

main()

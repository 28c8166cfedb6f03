"""The ``loraformat`` command line: a thin click layer over the public Python API."""

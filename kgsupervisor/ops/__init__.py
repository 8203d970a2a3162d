"""What operators touch: the command line, the Python API, the status server, metrics and reports."""

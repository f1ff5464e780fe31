"""Standalone tool scripts beside the package (not installed with it): the torchvision weight
converter (`convert_torchvision`) and VisA's conversion to the MVTec layout (`convert_visa`).
Run them from the repository root as `python -m tools.<name>` or `python tools/<name>.py`."""

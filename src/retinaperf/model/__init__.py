"""The network and how it computes: RetinaNet, its input transform, loss, detection
selection, precision policies and backbone weights. Imports only the base modules."""

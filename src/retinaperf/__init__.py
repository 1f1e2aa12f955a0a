"""retinaperf: train RetinaNet ResNet-50-FPN on COCO2017 and report how well a machine does it.

Kept free of heavy imports: the CLI reads the clock before torch is imported, as e2e_time starts
at the command.
"""

__version__ = "0.1.0"

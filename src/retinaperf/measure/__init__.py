"""What a run measures: the meter (times, counts), memory, energy, the system monitor,
FLOPs and utilisation, profiling, the environment, COCO scoring. Imports the base modules,
model/ and data/."""

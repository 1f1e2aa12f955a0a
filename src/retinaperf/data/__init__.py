"""COCO2017 data: the annotation index, records and loading, batch sampling, the generated
datasets. Imports only the base modules."""

# FlagPerf sources this before starting the ranks (as its retinanet-pytorch case does).
export OMP_NUM_THREADS=1

# FlagPerf RetinaNet's A100 2x8 row (training/nvidia/retinanet-pytorch/config in FlagPerf):
# local batch 16, lr 0.08. retinaperf runs it as its preset A100-2x8; every other key of
# FlagPerf's RetinaNet base config is retinaperf's default (integrations/flagperf/README.md).
vendor: str = "nvidia"

train_batch_size = 16
eval_batch_size = 16
lr = 0.08

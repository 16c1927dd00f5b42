# The embedded demo net (mmfuse.demo.DemoNet) as an MMEngine model on
# synthetic images: no mmdet, mmseg, data files or downloads.
#   python -m mmfuse.demo_runner checkpoint work_dirs/demo.pth
#   python tools/fuse_conv_bn.py configs/demo/demo_classifier.py \
#       work_dirs/demo.pth work_dirs/demo_fused.pth
#   python -m mmfuse.demo_runner test configs/demo/demo_classifier_fuse.py \
#       work_dirs/demo_fused.pth
custom_imports = dict(
    imports=['mmfuse', 'mmfuse.synthetic', 'mmfuse.demo_model'],
    allow_failed_imports=False)
default_scope = 'mmengine'

model = dict(
    type='MMFuseDemoClassifier',
    channels=8,
    data_preprocessor=dict(
        type='ImgDataPreprocessor', mean=[127.5] * 3, std=[64.0] * 3))

test_pipeline = [dict(type='MMFusePackImage')]
dataset = dict(
    type='MMFuseSyntheticDataset',
    num_samples=16,
    image_size=(32, 32),
    pipeline=test_pipeline)

train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=True),
    collate_fn=dict(type='pseudo_collate'),
    dataset=dict(dataset, seed=1))
val_dataloader = dict(
    batch_size=4,
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='pseudo_collate'),
    dataset=dataset)
test_dataloader = val_dataloader
val_evaluator = dict(type='MMFuseClassificationMetric')
test_evaluator = val_evaluator

train_cfg = dict(by_epoch=True, max_epochs=2, val_interval=1)
val_cfg = dict()
test_cfg = dict()
optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9))

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=1),
    checkpoint=dict(type='CheckpointHook', interval=1))
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
log_level = 'INFO'
randomness = dict(seed=0)

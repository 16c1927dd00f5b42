"""FuseConvBNHook with 2 CPU processes: torchrun, gloo, launcher='pytorch'.

Each rank tests with the hook fusing in memory, then with a fused
checkpoint, then trains one epoch validating a fused copy; every rank must
end with the same fused model, and the metrics must equal a single process
run's.
"""
import json
import os
import socket

import pytest
from hook_helpers import (DEMO_CONFIG, REPO, demo_config,
                          make_demo_checkpoint, run_python)
from mmengine.runner import Runner

from mmfuse.checkpoint import same_structure
from mmfuse.cli import main as tool_main

WORKER = os.path.join(REPO, 'tests', 'distributed_worker.py')


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@pytest.fixture(scope='module')
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp('distributed')
    checkpoint = make_demo_checkpoint(str(folder / 'demo.pth'))
    fused = str(folder / 'fused.pth')
    assert tool_main([DEMO_CONFIG, checkpoint, fused, '--quiet']) == 0
    result = run_python([
        '-m', 'torch.distributed.run', '--nproc_per_node', '2',
        '--master_addr', '127.0.0.1', '--master_port',
        str(_free_port()), WORKER, '--checkpoint', checkpoint, '--fused',
        fused, '--out-dir',
        str(folder)
    ], timeout=500, env={'OMP_NUM_THREADS': '1'})
    output = result.stdout + result.stderr
    (folder / 'torchrun.log').write_text(output)
    causes = [line for line in output.splitlines()
              if any(word in line for word in ('Error', 'error:', 'gloo',
                                               'terminate', 'Traceback'))]
    assert result.returncode == 0, '\n'.join(causes[-30:]) + \
        result.stderr[-3000:]
    ranks = []
    for rank in range(2):
        with open(folder / f'rank{rank}.json') as stream:
            ranks.append(json.load(stream))
    return ranks, checkpoint, output


def test_both_ranks_ran_distributed(two_ranks):
    ranks, _, log = two_ranks
    for rank in ranks:
        assert rank['world_size'] == 2
        for stage in ('memory', 'fused', 'train'):
            assert rank[stage]['wrapper'] == 'MMDistributedDataParallel'
    # The report is logged once, by rank 0.
    assert log.count('FuseConvBNHook (test): mmfuse: folded') == 1
    assert ranks[0]['memory']['reported']
    assert not ranks[1]['memory']['reported']


def test_every_rank_fuses_identically(two_ranks):
    ranks, _, _ = two_ranks
    for stage in ('memory', 'fused'):
        first, second = ranks[0][stage], ranks[1][stage]
        assert first['record'] is not None
        assert first['record'] == second['record']
        assert first['digest'] == second['digest']
        assert first['metrics'] == second['metrics']
    assert same_structure(ranks[0]['memory']['record'],
                          ranks[0]['fused']['record'])
    assert ranks[0]['memory']['digest'] == ranks[0]['fused']['digest']


def test_metrics_equal_a_single_process_run(two_ranks, tmp_path):
    ranks, checkpoint, _ = two_ranks
    cfg = demo_config(str(tmp_path), fuse=True)
    cfg.load_from = checkpoint
    single = Runner.from_cfg(cfg).test()
    for stage in ('memory', 'fused'):
        metrics = ranks[0][stage]['metrics']
        assert metrics['demo/accuracy'] == single['demo/accuracy']
        for key in ('demo/mean_logit', 'demo/logit_checksum'):
            assert metrics[key] == pytest.approx(single[key], rel=1e-6)


def test_validation_in_distributed_training(two_ranks):
    ranks, _, log = two_ranks
    assert ranks[0]['train']['val_reported']
    assert 'FuseConvBNHook (val): mmfuse: folded' in log
    for rank in ranks:
        assert not rank['train']['fused_after_training']
    assert ranks[0]['train']['parameters'] == ranks[1]['train']['parameters']

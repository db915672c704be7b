"""The benchmark scripts measure what they say: stage times parsed from a repro log, and storage ratios
computed from the stores' real bytes, the loop-overhead ratio from the same batches on both sides."""

import numpy as np
import pytest
import torch

from bench import loop_overhead, random_walk_memory, refcoco_scale, repro_time, storage
from bench.common import directory_bytes
from pipeline.store import PSEUDO_MASK_SCHEMA, RESPONSE_SCHEMA, RecordWriter
from pipeline.train.loop import Epoch, StepOut, Training, TrainingRun


def test_stage_wall_times_are_parsed_from_the_repro_log():
    log = "Running stage 'index':\n[index] wall time 1.9 s\nnoise\n[train_step1] wall time 200.0 s\n"
    assert dict(repro_time.STAGE_TIME.findall(log)) == {"index": "1.9", "train_step1": "200.0"}


def test_storage_ratios_use_the_bytes_on_disk(in_tmp_cwd):
    ids = np.arange(10)
    attrs = {"input_size": [192, 192]}
    with RecordWriter("artifacts/responses.zarr", RESPONSE_SCHEMA, (6, 6), attrs=attrs) as w:
        w.add_split("train", 10)
        w.write("train", 0, np.random.default_rng(0).random((10, 6, 6)), sent_id=ids, ref_id=ids // 2,
                image_id=ids, height=ids * 0 + 100, width=ids * 0 + 200)
    with RecordWriter("artifacts/pseudo_masks.zarr", PSEUDO_MASK_SCHEMA, (32, 32)) as w:
        w.add_split("train", 5)
        w.write("train", 0, np.ones((5, 32, 32), np.uint8), ref_id=ids[:5], image_id=ids[:5],
                height=ids[:5] * 0 + 100, width=ids[:5] * 0 + 200, sent_id_selected=ids[:5])
    r = storage.run()
    npy = 100 * 200 * 4 + storage.NPY_HEADER
    assert r["npy_bytes_per_ref"] == npy
    on_disk = directory_bytes(in_tmp_cwd / "artifacts" / "responses.zarr")
    assert r["responses_bytes_per_sentence"] == pytest.approx(on_disk / 10)
    assert r["pseudo_masks_ratio"] == pytest.approx(r["pseudo_mask_bytes_per_ref"] / npy)
    assert 0 < r["responses_ratio"] < 1


def test_cpu_peak_memory_sees_the_sparse_walk_above_an_earlier_larger_peak():
    """The sparse walk's working set (~2 MiB at 40x60) is below the peaks of importing torch and of the
    warm-up; a high-water mark that is not reset reported 0 bytes for it."""
    sparse = random_walk_memory.run(device="cpu", height=40, width=60, exp_times=2)["sparse"]
    transitions = 40 * 60 * (2 * 5 + 1) ** 2 * 4  # one float32 weight per pixel and neighbour
    assert transitions / 2 < sparse["peak_bytes"] < 20 * transitions


class _Counting(Training):
    name = "count"

    def __init__(self) -> None:
        self.model = self.net = torch.nn.Linear(2, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda t: 1.0)
        self.epochs, self.seen = 5, []

    def epoch(self, epoch: int) -> Epoch:
        raise AssertionError("the benchmark replays its own batches")

    def step(self, item: torch.Tensor) -> StepOut:
        self.seen.append(item)
        loss = self.net(item).square().mean()
        return StepOut(loss, {"loss": loss})


def test_loop_and_bare_sides_step_through_the_same_batches_once(tmp_path):
    items = [torch.full((3, 2), float(i)) for i in range(4)]
    training = _Counting()
    loop_overhead.bare(training, items)
    run = TrainingRun("count", resume_path=tmp_path / "r.pt")
    loop_overhead.fit(loop_overhead.Replay(training, items), run)
    assert [id(x) for x in training.seen] == [id(x) for x in items + items]  # one pass each, in order
    assert training.scheduler.last_epoch == 8 and (tmp_path / "r.pt").is_file()  # the loop checkpoints
    assert loop_overhead.ratio(45.0, 50.0) == pytest.approx(0.9)


def test_refcoco_sized_set_has_the_release_split_counts_and_indexes_whole(tmp_path):
    """The generated set is REFER's layout with RefCOCO's per-split counts (scaled), and the index stage's
    own functions keep every ref of it: the bench times real work, not a set the index rejects."""
    from pipeline.data.index import build_index
    from pipeline.data.refer import load_refer

    data = refcoco_scale.write_refcoco_sized(tmp_path, scale=0.002, workers=1)
    refs, instances = load_refer(tmp_path, "refcoco", "unc")
    tables, report = build_index(refs, instances, tmp_path / "images")
    expected = refcoco_scale.split_counts(0.002)
    assert report["kept"]["refs"] == data["refs"] == sum(r for _, r, _ in expected.values())
    sentences = tables["sentences"].to_pandas()
    images = tables["images"].to_pandas()
    refs_table = tables["refs"].to_pandas()
    for split, (n_img, n_ref, n_sent) in expected.items():
        assert (sentences["split"] == split).sum() == n_sent
        assert (refs_table["split"] == split).sum() == n_ref
        assert refs_table.loc[refs_table["split"] == split, "image_id"].nunique() == n_img
    assert set(images["width"]) == {640} and set(images["height"]) == {480}
    assert refcoco_scale.split_counts(1.0)["train"] == (16_994, 42_404, 120_624)
    full = refcoco_scale.split_counts(1.0).values()
    assert [sum(c[k] for c in full) for k in range(3)] == [19_994, 50_000, 142_210]


def test_refcoco_scale_projection_divides_the_parallel_work_and_adds_the_serial_part():
    costs = {"ranks_speedup": 1.8, "split": (10, 100, 300), "decode_s": 0.01, "affinity_s": 50.0,
             "per_masked_image_s": 0.1, "per_sentence_text_s": 0.02}
    work = 10 * 0.01 + 100 * 0.5
    assert refcoco_scale.project(costs, 4, 0.5, False) == pytest.approx(work / (4 * 0.9) + 50)
    with_prms = work + 300 * 0.12
    assert refcoco_scale.project(costs, 4, 0.5, True) == pytest.approx(with_prms / (4 * 0.9) + 50)
    superlinear = {**costs, "ranks_speedup": 2.5}  # efficiency is capped at 1
    assert refcoco_scale.project(superlinear, 4, 0.5, False) == pytest.approx(work / 4 + 50)


@pytest.mark.slow
def test_refcoco_scale_bench_measures_every_figure_on_a_small_set():
    r = refcoco_scale.run(scale=0.002, objects=4)
    assert r["refs"] == r["index"]["kept_refs"] and r["index"]["peak_bytes"] > 0
    assert r["stores"]["sentences"] == r["sentences"]
    assert r["stores"]["objects"] == refcoco_scale.split_counts(0.002)["train"][1]
    assert 0 < r["stores"]["responses_per_sentence"] < 10 * 10 * 2 * 4  # compressed below raw float16 x4
    costs = r["costs"]
    assert costs["per_object_full_s"] > costs["per_object_working_s"] > 0
    assert costs["ranks_speedup"] > 0 and costs["workers_speedup"] > 0
    table = refcoco_scale.report(r)
    rows = len(refcoco_scale.PROJECTED_CORES)
    assert "PROJECTED" in table and table.count("| RefCOCO") == len(refcoco_scale.TRAIN_SPLITS) * rows


def test_paper_step1_params_are_the_readme_command_with_local_stand_ins(tmp_path):
    """bench.paper_step1 measures the README's real-data configuration at the paper's batch, with only
    the data location and weight paths replaced (a stale README block would make it measure another)."""
    import yaml

    from bench import paper_step1
    from pipeline.params import load_params

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(paper_step1.paper_params(tmp_path / "w", 100)))
    params = load_params(tmp_path / "params.yaml")
    assert (params.model.clip.name, params.model.hidden_dim, params.step1.input_size) == (
        "RN50-quickgelu", 1024, 320)
    assert params.model.frozen_clip.name == "ViT-B-32-quickgelu" and params.step1.calibration_size == "auto"
    assert (params.step1.batch_size, params.step1.num_negatives, params.step1.calibration_negatives) == (
        48, 47, 6)
    assert params.model.clip.pretrained == str(tmp_path / "w" / "RN50-checkpoint.pt")
    assert params.data.refer.root == "artifacts/synthetic" and params.synthesize.num_images == 100


def test_step1_throughput_line_names_peak_memory_only_where_measured():
    from bench.step1_throughput import describe

    cuda = describe({"device": "cuda", "fp32_images_per_s": 314.0, "amp_images_per_s": 333.8,
                     "amp_speedup": 1.063, "fp32_peak_mib": 13028.0, "amp_peak_mib": 8180.0})
    assert "(x1.06)" in cuda and "13028 MiB fp32, 8180 MiB bf16" in cuda
    cpu = describe({"device": "cpu", "fp32_images_per_s": 52.0}, "Paper Step-1")
    assert cpu == "Paper Step-1 on cpu: 52.0 images/s fp32"

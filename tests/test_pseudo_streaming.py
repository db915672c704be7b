"""make_pseudo_masks streams: a shard's maps are built when it is due and dropped after it is written.

- the streamed masks equal the all-at-once computation (PRMS-off choice, CRF-confident seeds, one
  boundary map and one batched walk per image, threshold), with 1 and with 2 worker processes, also
  where an image's objects straddle two shards;
- the number of S x S maps alive at any shard does not grow with the number of objects (counted
  through the one function that builds them), while the all-at-once path holds two per object;
- PRMS (Eq. 10) yields each object's choice as soon as its masked images are encoded, in the same
  encoder batches as before;
- responses are held as one compact float16 array that reads back the store's float32 values;
- the image cache of the stage has a fixed size;
- the object choices are built from a few arrays for the whole split (a per-object DataFrame list was
  the stage's one memory that grew with the split, about 55 KB an object), with the same rows as a
  ``groupby``.
"""

from __future__ import annotations

import gc
import tracemalloc
import weakref

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_pipeline import ROOT

from pipeline.maps import mask_images
from pipeline.params import load_params
from pipeline.pseudo import labels as L
from pipeline.pseudo.affinity import AffinityNet
from pipeline.pseudo.prms import PrmsItem, cumulative_scores, iter_select, select_batch
from pipeline.pseudo.refine import to_pseudo_mask

SIZE = 48


class FakeBank:
    """``ImageBank.get`` over seeded random images with a few flat rectangles (CRF has edges to find)."""

    size = SIZE

    def __init__(self) -> None:
        self.calls = 0

    def get(self, image_id: int) -> torch.Tensor:
        self.calls += 1
        rng = np.random.default_rng(int(image_id))
        image = np.full((SIZE, SIZE, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        for _ in range(3):
            y, x = rng.integers(0, SIZE - 16, 2)
            image[y:y + 16, x:x + 16] = rng.integers(0, 256, 3)
        return torch.from_numpy(image).permute(2, 0, 1).contiguous()


def _dataset(n_objects: int, per_image: int = 3) -> tuple[pd.DataFrame, dict[int, np.ndarray]]:
    """Sentences (1-2 per object, ``per_image`` objects an image) and 6x6 responses with one bump."""
    rng = np.random.default_rng(n_objects)
    rows, responses, sent = [], {}, 0
    grid = np.arange(6, dtype=np.float32)
    for k in range(n_objects):
        ref, image = 100 + k, 1 + k // per_image
        for _ in range(1 + k % 2):
            sent += 1
            cy, cx = rng.uniform(0, 6, 2)
            bump = np.exp(-((grid[:, None] - cy) ** 2 + (grid[None, :] - cx) ** 2) / 4)
            responses[sent] = (8 * bump + rng.normal(0, 0.3, (6, 6))).astype(np.float32)
            rows.append({"sent_id": sent, "ref_id": ref, "image_id": image, "height": 60, "width": 80,
                         "text": "x"})
    return pd.DataFrame(rows), responses


def _params(**update):
    p = load_params(ROOT / "params.yaml").pseudo_masks
    affinity = p.affinity.model_copy(update={"input_size": SIZE, "epochs": 1, "max_samples": 8})
    return p.model_copy(update={"size": SIZE, "affinity": affinity, "workers": 1, **update})


def _objects(sentences, responses, images):
    return L.select_objects(sentences, responses, images, None, use_prms=False, off_choice="first",
                            max_tokens=16, calibration_size=0, device=torch.device("cpu"), seed=0)


def _ranges(n: int, shard: int) -> list[tuple[int, int]]:
    return [(a, min(a + shard, n)) for a in range(0, n, shard)]


def _streamed(objects, responses, images, p, net, labels, shard):
    out = {}
    with L.refine_pool(p) as pool:
        for a, b, selection, masks in L.iter_pseudo_mask_shards(objects, responses, images, p, net,
                                                                 dict(labels), _ranges(len(objects), shard),
                                                                 pool):
            assert list(selection.objects["ref_id"]) == list(objects["ref_id"].iloc[a:b])
            assert list(masks) == list(selection.objects["ref_id"])
            out.update(masks)
    return out


def test_streamed_masks_equal_the_all_at_once_computation_with_one_and_two_workers():
    sentences, responses = _dataset(20)
    images = L.RecentImages(FakeBank())
    p = _params()
    objects = _objects(sentences, responses, images)
    net, labels = L.train_shared_affinity(objects, responses, images, p, seed=0, device=torch.device("cpu"))
    assert 0 < len(labels) <= p.affinity.max_samples  # only the sample's CRF labels are held

    # all at once, as the stage did before it streamed: every map, every label, then the walks
    whole = L.object_maps(objects, responses, SIZE)
    all_labels = L.confident_seed_labels([images.hwc(i) for i in objects["image_id"]],
                                         [whole.fg_maps[int(r)] for r in objects["ref_id"]], p)
    seeds = {int(r): whole.fg_maps[int(r)] * (lab == 1) for r, lab in zip(objects["ref_id"], all_labels,
                                                                         strict=True)}
    soft = L.refined_maps(whole.objects, seeds, images, p, net)
    expected = {r: to_pseudo_mask(m, p.threshold, p.keep) for r, m in soft.items()}
    assert any(m.any() for m in expected.values()), "the check needs non-empty masks"

    # shards of 4 with 3 objects an image: images straddle shard boundaries
    for workers in (1, 2):
        got = _streamed(objects, responses, images, p.model_copy(update={"workers": workers}), net, labels, 4)
        assert got.keys() == expected.keys()
        for ref in expected:
            np.testing.assert_array_equal(got[ref], expected[ref], err_msg=f"ref {ref}, {workers} workers")


def _count_maps(monkeypatch) -> dict:
    """Count the S x S maps alive: every one is built by ``labels._working_map``."""
    state = {"alive": 0}
    original = L._working_map

    def tracked(response, size):
        out = original(response, size)
        state["alive"] += 1
        weakref.finalize(out, lambda: state.__setitem__("alive", state["alive"] - 1))
        return out

    monkeypatch.setattr(L, "_working_map", tracked)
    return state


def _peak_maps_streamed(n_objects: int, shard: int, state: dict) -> int:
    sentences, responses = _dataset(n_objects)
    images = L.RecentImages(FakeBank())
    p = _params(refine="none")
    objects = _objects(sentences, responses, images)
    peak = 0
    with L.refine_pool(p) as pool:
        for _, _, selection, masks in L.iter_pseudo_mask_shards(objects, responses, images, p, None, {},
                                                                _ranges(len(objects), shard), pool):
            gc.collect()
            peak = max(peak, state["alive"])
            del selection, masks
    return peak


def test_maps_alive_are_bounded_by_the_shard_not_the_split(monkeypatch):
    state = _count_maps(monkeypatch)
    shard = 6
    small, large = _peak_maps_streamed(24, shard, state), _peak_maps_streamed(96, shard, state)
    assert 0 < small <= 2 * shard + 2  # a shard's selected + first maps (+ a straddling image's)
    assert large == small, "the maps alive grew with the number of objects"

    # the counter sees the all-at-once path hold two maps per object
    sentences, responses = _dataset(96)
    held = L.select_responses(sentences, responses, FakeBank(), None, use_prms=False, off_choice="first",
                              max_tokens=16, calibration_size=0, device=torch.device("cpu"), seed=0)
    gc.collect()
    assert state["alive"] >= 2 * 96
    del held


def test_prms_yields_each_choice_before_reading_every_item():
    torch.manual_seed(0)
    consumed, batches = [], []

    def encode(x: torch.Tensor) -> torch.Tensor:
        batches.append(len(x))
        return x.mean(dim=(2, 3))  # per image: independent of the batch

    def items(n):
        for k in range(n):
            consumed.append(k)
            m = 1 + k % 3
            yield PrmsItem(torch.rand(3, 16, 16), torch.randn(m, 4, 4), torch.randn(m, 3))

    stream = iter_select(items(40), encode, 8, batch_size=5)
    first = next(stream)
    assert len(consumed) < 10, "the first choice waited for the whole split"
    results = [first, *stream]
    assert len(results) == 40 and len(consumed) == 40
    assert all(b == 5 for b in batches[:-1]) and 0 < batches[-1] <= 5  # the encoder batches of before

    # each choice is Eq. 10's on the item alone: CS_t = sum_m cos(E(I * R_t), T_m)
    batch = list(items(40))
    for item, (pick, scores) in zip(batch, select_batch(iter(batch), encode, 8, 5), strict=True):
        if len(item.responses) == 1:
            assert pick == 0 and torch.isnan(scores).all()
            continue
        masked = mask_images(item.image01.expand(len(item.responses), -1, -1, -1), item.responses, 8)
        alone = cumulative_scores(encode(masked), item.text_emb)
        assert pick == int(alone.argmax())
        torch.testing.assert_close(scores, alone)


class _FakeStore:
    def __init__(self, maps: np.ndarray) -> None:
        self.maps = maps

    def iter_batches(self, split, batch_size):
        for s in range(0, len(self.maps), batch_size):
            e = min(s + batch_size, len(self.maps))
            yield {"response": self.maps[s:e], "sent_id": np.arange(s, e) + 7}


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_responses_are_one_compact_array_with_the_stores_values(dtype):
    rng = np.random.default_rng(0)
    maps = rng.normal(0, 3, (10, 6, 6)).astype(dtype).astype(np.float32)  # float16 store: exact in half
    table = L.load_split_responses(_FakeStore(maps), "train")
    assert len(table) == 10 and sorted(table) == list(range(7, 17))
    for k in range(10):
        value = table[7 + k]
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, maps[k])
    assert table._maps.dtype == (np.float16 if dtype == np.float16 else np.float32)


def _grouped_reference(sentences: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The choices as the stage made them with a ``groupby`` (PRMS off, random pick per object)."""
    from pipeline.pseudo.prms import choose_without_prms
    records = []
    for ref, g in sentences.groupby("ref_id", sort=True):
        g = g.sort_values("sent_id")
        pick = choose_without_prms(len(g), "random", np.random.default_rng([seed, int(ref)]))
        sids = g["sent_id"].to_numpy()
        records.append({"ref_id": int(ref), "image_id": int(g["image_id"].iloc[0]),
                        "height": int(g["height"].iloc[0]), "width": int(g["width"].iloc[0]),
                        "sent_id_selected": int(sids[pick]), "num_expressions": len(sids),
                        "changed": bool(pick != 0), "sent_id_first": int(sids[0])})
    return pd.DataFrame.from_records(records)


def _random_choices(sentences, responses):
    return L.select_objects(sentences, responses, None, None, use_prms=False, off_choice="random",
                            max_tokens=16, calibration_size=0, device=torch.device("cpu"), seed=3)


def test_object_choices_equal_a_groupby_in_any_row_order():
    sentences, responses = _dataset(40)
    shuffled = sentences.sample(frac=1.0, random_state=1).reset_index(drop=True)
    got = _random_choices(shuffled, responses)
    pd.testing.assert_frame_equal(got, _grouped_reference(shuffled, seed=3))
    groups = L.ObjectGroups(shuffled)
    for ref, rows in zip(groups.ref_ids, groups, strict=True):
        assert (shuffled["ref_id"].to_numpy()[rows] == ref).all()
        assert np.all(np.diff(shuffled["sent_id"].to_numpy()[rows]) > 0)
    assert len(L.ObjectGroups(sentences.iloc[:0])) == 0


def test_object_choices_hold_bytes_not_kilobytes_per_object():
    def traced_peak(n_objects: int) -> int:
        sentences, responses = _dataset(n_objects)
        tracemalloc.start()
        try:
            _random_choices(sentences, responses)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = 300, 3000
    per_object = (traced_peak(large) - traced_peak(small)) / (large - small)
    assert per_object < 1024, f"{per_object:.0f} bytes an object (a DataFrame per object: ~4.5 KB)"


def test_recent_images_keep_a_fixed_number_of_images():
    bank = FakeBank()
    images = L.RecentImages(bank, capacity=3)
    for image_id in (1, 1, 2, 1, 3, 4, 1):
        images.get(image_id)
    assert len(images._recent) == 3
    assert bank.calls == 4  # 1, 2, 3, 4 decoded once each; 1 stayed recent
    images.get(2)  # evicted: decoded again
    assert bank.calls == 5
    assert images.hwc(4).shape == (SIZE, SIZE, 3)


def test_affinity_sample_is_bounded_and_drawn_as_before():
    p = _params()
    for walk_seed in ("confident", "map"):
        q = p.model_copy(update={"walk_seed": walk_seed})
        labelled, sample = L.affinity_sample(1000, q, seed=0)
        assert len(sample) == q.affinity.max_samples and set(sample) <= set(labelled)
        rng = np.random.default_rng(0)  # the draws of the all-at-once code
        expected = np.sort(rng.permutation(1000)[:q.affinity.max_samples])
        np.testing.assert_array_equal(labelled, expected)


def test_an_untrained_net_pool_gives_the_in_process_result():
    """Worker processes walk in the boundary map the main process computed with the net it was given."""
    sentences, responses = _dataset(6)
    images = L.RecentImages(FakeBank())
    p = _params()
    objects = _objects(sentences, responses, images)
    torch.manual_seed(3)
    net = AffinityNet().eval()
    one = _streamed(objects, responses, images, p, net, {}, 4)
    two = _streamed(objects, responses, images, p.model_copy(update={"workers": 2}), net, {}, 4)
    for ref in one:
        np.testing.assert_array_equal(one[ref], two[ref])


def test_the_image_cache_holds_6510_refcoco_images_at_320_and_the_rest_is_decoded_every_epoch():
    from bench.refcoco_scale import uncached_epoch_cost

    cost = uncached_epoch_cost(0.01)  # 10 ms a decode
    assert cost["cached"] == 6_510 and cost["uncached"] == 16_994 - 6_510
    assert cost["decodes_per_epoch"] == pytest.approx(42_404 * 10_484 / 16_994)
    assert cost["one_thread_s"] == pytest.approx(cost["decodes_per_epoch"] * 0.01)
    assert cost["pool_s"] == pytest.approx(cost["one_thread_s"] / 8)


def test_crf_labels_read_a_chunk_at_a_time_and_come_back_in_order():
    sentences, responses = _dataset(12)
    images = L.RecentImages(FakeBank())
    p = _params()
    objects = _objects(sentences, responses, images)
    maps = [L._working_map(responses[int(s)], SIZE) for s in objects["sent_id_selected"]]
    whole = L.confident_seed_labels([images.hwc(i) for i in objects["image_id"]], maps, p)
    read = []

    def lazily():
        for i in objects["image_id"]:
            read.append(i)
            yield images.hwc(i)

    with L.refine_pool(p) as pool:
        tasks = ((im, fg, p.conf_fg, p.conf_bg, p.crf) for im, fg in zip(lazily(), maps, strict=True))
        results = L._chunked_map(pool, L._confident_task, tasks, 5)
        first = next(results)
        assert len(read) == 5  # one chunk read, not the whole list
        chunked = [first, *results]
    assert all(np.array_equal(a, b) for a, b in zip(whole, chunked, strict=True))
    on_demand = L._ImagesOnDemand(images, objects["image_id"].to_numpy())
    assert len(on_demand) == len(objects) and np.array_equal(on_demand[3], images.hwc(objects["image_id"][3]))
    with pytest.raises(IndexError):
        on_demand[len(objects)]

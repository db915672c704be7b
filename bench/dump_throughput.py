"""Response dump throughput vs forward-only throughput of the same Step-1 model (goal: ratio >= 0.9).

Forward-only runs :func:`pipeline.responses.iter_responses` (batching, model, copy to host) and drops
the maps; the dump does the same and writes them into a sharded Zarr store exactly as the
``dump_responses`` stage does. The ratio is the share of model throughput the storage path keeps.

    python -m bench.dump_throughput [--split val]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.common import best_of, require
from pipeline import paths
from pipeline.data.index import load_index
from pipeline.data.samples import ImageBank, split_sentences
from pipeline.models.checkpoints import load_localiser
from pipeline.params import load_params
from pipeline.responses import iter_responses
from pipeline.runtime import select_device
from pipeline.store import RESPONSE_SCHEMA, RecordWriter


def run(split: str = "val", repeats: int = 2) -> dict:
    require(paths.STEP1 / "model.pt", paths.INDEX)
    params = load_params()
    device = select_device(params.base.device)
    model, meta = load_localiser(paths.STEP1 / "model.pt")
    index = load_index(paths.INDEX)
    rows = split_sentences(index.images, index.sentences, split)
    bank = ImageBank.from_index(index.images, meta["input_size"])
    bank.preload(rows["image_id"])
    batch = params.dump.batch_size

    def responses(part=rows, batch_size=batch):
        return iter_responses(model, bank, part, batch_size, meta["max_tokens"], device, show_progress=False)

    def forward_only() -> None:
        for _ in responses():
            pass

    def dump() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            _, probe = next(responses(rows.iloc[:1], 1))  # the map shape, probed as the stage does
            attrs = {"input_size": [meta["input_size"]] * 2}
            shard_size = params.dump.shard_size
            with RecordWriter(Path(tmp) / "r.zarr", RESPONSE_SCHEMA, probe.shape[1:], shard_size, attrs) as w:
                w.add_split(split, len(rows))
                for start, maps in responses():
                    w.write_table(split, start, maps, rows.iloc[start:start + len(maps)])

    forward_only()  # warm-up: kernels, allocator, thread pools
    t_forward = best_of(repeats, forward_only)
    t_dump = best_of(repeats, dump)
    n = len(rows)
    return {"sentences": n, "forward_per_s": n / t_forward, "dump_per_s": n / t_dump,
            "ratio": t_forward / t_dump, "device": str(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="val")
    r = run(parser.parse_args().split)
    print(f"dump {r['dump_per_s']:.0f} sent/s vs forward-only {r['forward_per_s']:.0f} sent/s "
          f"on {r['device']} ({r['sentences']} sentences): ratio {r['ratio']:.3f} (goal >= 0.9)")


if __name__ == "__main__":
    main()

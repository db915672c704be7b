"""Stage dump_responses: the raw Step-1 response map of every expression of the train split and of
each evaluation split, into one sharded Zarr v3 store (``artifacts/responses.zarr``, a group per split),
keyed by ``sent_id`` and carrying what maps a response back onto its image.

With ``base.nproc > 1`` the stage runs under torchrun and each rank dumps whole shards of the store
(see :mod:`pipeline.store`); the store is the same as a single-process dump's. The store records the
fingerprint of the index it was dumped from, so that a later index (another seed) is refused by the
stages that read it rather than scored against the wrong sentences.
"""



from pipeline import paths
from pipeline.data.index import load_index
from pipeline.data.samples import ImageBank, split_sentences
from pipeline.data.splits import require_eval_splits
from pipeline.models.checkpoints import load_localiser
from pipeline.responses import iter_responses
from pipeline.stage import StageTimer, start_distributed_stage
from pipeline.store import RESPONSE_SCHEMA, RecordWriter


def main() -> None:
    params, device, dist = start_distributed_stage("dump_responses")
    model, meta = load_localiser(paths.STEP1 / "model.pt")
    index = load_index(paths.INDEX)
    eval_splits = require_eval_splits("dump_responses", index, params.data.eval_splits)
    size = meta["input_size"]
    bank = ImageBank.from_index(index.images, size, workers=params.base.num_workers)
    splits = ["train", *[s for s in eval_splits if s != "train"]]
    first = split_sentences(index.images, index.sentences, splits[0]).iloc[:1]
    _, probe = next(iter_responses(model, bank, first, 1, meta["max_tokens"], device, show_progress=False))
    attrs = {"input_size": [size, size], "model": "artifacts/step1/model.pt"}
    writer = RecordWriter(paths.RESPONSES, RESPONSE_SCHEMA, probe.shape[1:], params.dump.shard_size, attrs,
                          dist=dist, index=paths.INDEX)  # readers refuse the store once the index changes
    with StageTimer("dump_responses"), writer:
        for split in splits:
            rows = split_sentences(index.images, index.sentences, split)
            writer.add_split(split, len(rows))
            for start, maps in iter_responses(model, bank, rows, params.dump.batch_size, meta["max_tokens"],
                                              device, desc=f"dump {split}", ranges=writer.owned_ranges(split),
                                              show_progress=dist.is_main):
                writer.write_table(split, start, maps, rows.iloc[start:start + len(maps)])
            if dist.is_main:
                print(f"[dump_responses] {split}: {len(rows)} sentences")
    dist.close()


if __name__ == "__main__":
    main()

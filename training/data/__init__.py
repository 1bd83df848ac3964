"""Datasets: from an uploaded archive (or a folder) to labeled images a training run can trust.

One concern per module, each usable without the others' internals:
- `dataset`: the types (`IngestLimits`, `Item`, `Skipped`, `Dataset`) and the manifest that
  records an ingested dataset on disk (`write_manifest`, `read_manifest`);
- `archives`: safe unpacking of .zip / .tar.gz / .tar uploads (limits counted while streaming,
  path safety, links and special files refused);
- `ingest`: `ingest(source, workdir, limits)`, which unpacks an archive (or reads a folder in
  place), finds the class layout, decodes and hashes every file, drops duplicates and checks
  that the result can be trained on;
- `store`: `DatasetStore`, uploaded archives kept by content, each ingested once (by the ingest
  worker, or by the training job that needs it first) into a folder and a manifest.

Importing any of them imports no TensorFlow: the ingest worker runs them without it.
"""
